"""GLM-4.5 / 4.6 (glm4_moe): DeepSeek-V3's sigmoid rule with correction bias and scaling factor."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.adapters.scoring import SigmoidGroupScoring


@register_adapter
class Glm4MoeAdapter(FamilyAdapter):
    model_type = "glm4_moe"

    def router_class(self):
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

        return Glm4MoeTopkRouter

    def scoring(self, router):
        return SigmoidGroupScoring(router.num_group, router.topk_group, router.routed_scaling_factor, router.norm_topk_prob)
