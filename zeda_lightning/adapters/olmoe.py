"""OLMoE: softmax top-k without renormalisation (``norm_topk_prob=False`` in the released model)."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import SoftmaxTopKScoring


@register_adapter
class OlmoeAdapter(FamilyAdapter):
    model_type = "olmoe"
    router_path = "transformers.models.olmoe.modeling_olmoe:OlmoeTopKRouter"
    scoring_cls = SoftmaxTopKScoring
