"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): softmax over all experts, top-k, renorm over the k slots when
``norm_topk_prob``, weights cast back to the logits dtype."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import SoftmaxTopKScoring


@register_adapter
class Qwen3MoeAdapter(FamilyAdapter):
    model_type = "qwen3_moe"
    router_path = "transformers.models.qwen3_moe.modeling_qwen3_moe:Qwen3MoeTopKRouter"
    scoring_cls = SoftmaxTopKScoring
