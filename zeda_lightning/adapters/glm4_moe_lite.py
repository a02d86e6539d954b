"""GLM-4.7-Flash (glm4_moe_lite): sigmoid + correction bias, n_group = 1, routed_scaling_factor 1.8, one shared expert,
first layer dense."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.adapters.scoring import SigmoidGroupScoring


@register_adapter
class Glm4MoeLiteAdapter(FamilyAdapter):
    model_type = "glm4_moe_lite"

    def router_class(self):
        from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteTopkRouter

        return Glm4MoeLiteTopkRouter

    def scoring(self, router):
        return SigmoidGroupScoring(router.num_group, router.topk_group, router.routed_scaling_factor, router.norm_topk_prob)
