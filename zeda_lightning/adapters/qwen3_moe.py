"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): softmax over all experts, top-k, renorm over the k slots when
``norm_topk_prob``, weights cast back to the logits dtype."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.adapters.scoring import SoftmaxTopKScoring


@register_adapter
class Qwen3MoeAdapter(FamilyAdapter):
    model_type = "qwen3_moe"

    def router_class(self):
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

        return Qwen3MoeTopKRouter

    def scoring(self, router):
        return SoftmaxTopKScoring(norm_topk_prob=router.norm_topk_prob)
