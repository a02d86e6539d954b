"""Mixtral: softmax top-k always renormalised over the k slots, weights kept in fp32 (no cast back)."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.adapters.scoring import SoftmaxTopKScoring


@register_adapter
class MixtralAdapter(FamilyAdapter):
    model_type = "mixtral"

    def router_class(self):
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

        return MixtralTopKRouter

    def scoring(self, router):
        return SoftmaxTopKScoring(norm_topk_prob=True, cast_weights=False)
