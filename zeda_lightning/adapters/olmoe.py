"""OLMoE: softmax top-k without renormalisation (``norm_topk_prob=False`` in the released model)."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.adapters.scoring import SoftmaxTopKScoring


@register_adapter
class OlmoeAdapter(FamilyAdapter):
    model_type = "olmoe"

    def router_class(self):
        from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

        return OlmoeTopKRouter

    def scoring(self, router):
        return SoftmaxTopKScoring(norm_topk_prob=router.norm_topk_prob)
