"""LightningModules: distillation (the point of the package) and plain LM pretraining (the tiny teacher)."""

from zeda_lightning.modules.base import TrainModuleBase
from zeda_lightning.modules.distill import ZedaDistillModule, zero_experts_masked
from zeda_lightning.modules.opd import OnPolicyDistillModule
from zeda_lightning.modules.pretrain import LMPretrainModule

__all__ = ["LMPretrainModule", "OnPolicyDistillModule", "TrainModuleBase", "ZedaDistillModule", "zero_experts_masked"]
