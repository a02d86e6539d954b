"""Mixtral: softmax top-k always renormalised over the k slots, weights kept in fp32 (no cast back)."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import MixtralScoring


@register_adapter
class MixtralAdapter(FamilyAdapter):
    model_type = "mixtral"
    router_path = "transformers.models.mixtral.modeling_mixtral:MixtralTopKRouter"
    scoring_cls = MixtralScoring
