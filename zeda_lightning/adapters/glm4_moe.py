"""GLM-4.5 / 4.6 (glm4_moe): DeepSeek-V3's sigmoid rule with correction bias and scaling factor."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import SigmoidGroupScoring


@register_adapter
class Glm4MoeAdapter(FamilyAdapter):
    model_type = "glm4_moe"
    router_path = "transformers.models.glm4_moe.modeling_glm4_moe:Glm4MoeTopkRouter"
    scoring_cls = SigmoidGroupScoring
