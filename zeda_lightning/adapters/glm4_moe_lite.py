"""GLM-4.7-Flash (glm4_moe_lite): sigmoid + correction bias, n_group = 1, routed_scaling_factor 1.8, one shared expert,
first layer dense."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import SigmoidGroupScoring


@register_adapter
class Glm4MoeLiteAdapter(FamilyAdapter):
    model_type = "glm4_moe_lite"
    router_path = "transformers.models.glm4_moe_lite.modeling_glm4_moe_lite:Glm4MoeLiteTopkRouter"
    scoring_cls = SigmoidGroupScoring
