"""Qwen3-Next: Qwen3's softmax top-k rule; a gated shared expert in the block, hybrid linear attention elsewhere."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import SoftmaxTopKScoring


@register_adapter
class Qwen3NextAdapter(FamilyAdapter):
    model_type = "qwen3_next"
    router_path = "transformers.models.qwen3_next.modeling_qwen3_next:Qwen3NextTopKRouter"
    scoring_cls = SoftmaxTopKScoring
