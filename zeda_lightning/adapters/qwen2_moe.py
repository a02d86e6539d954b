"""Qwen2-MoE: Qwen3's softmax top-k rule (``norm_topk_prob`` is False in the released configs); the sigmoid-gated
shared expert lives in the block and is left alone."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import SoftmaxTopKScoring


@register_adapter
class Qwen2MoeAdapter(FamilyAdapter):
    model_type = "qwen2_moe"
    router_path = "transformers.models.qwen2_moe.modeling_qwen2_moe:Qwen2MoeTopKRouter"
    scoring_cls = SoftmaxTopKScoring
