"""FlexOlmo: OLMoE's softmax top-k rule (renormalised over the k slots only when ``norm_topk_prob``), weights cast
back to the logits' dtype."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import SoftmaxTopKScoring


@register_adapter
class FlexOlmoAdapter(FamilyAdapter):
    model_type = "flex_olmo"
    router_path = "transformers.models.flex_olmo.modeling_flex_olmo:FlexOlmoTopKRouter"
    scoring_cls = SoftmaxTopKScoring
