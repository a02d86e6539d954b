"""Qwen2-MoE: Qwen3's softmax top-k rule (``norm_topk_prob`` is False in the released configs); the sigmoid-gated
shared expert lives in the block and is left alone."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.adapters.scoring import SoftmaxTopKScoring


@register_adapter
class Qwen2MoeAdapter(FamilyAdapter):
    model_type = "qwen2_moe"

    def router_class(self):
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

        return Qwen2MoeTopKRouter

    def scoring(self, router):
        return SoftmaxTopKScoring(norm_topk_prob=router.norm_topk_prob)
