"""DeepSeek-V3: fp32 sigmoid scores, group-limited selection (n_group / topk_group) on scores + e_score_correction_bias,
unbiased weights renormalised (+1e-20) times routed_scaling_factor; shared experts in the block."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import SigmoidGroupScoring


@register_adapter
class DeepseekV3Adapter(FamilyAdapter):
    model_type = "deepseek_v3"
    router_path = "transformers.models.deepseek_v3.modeling_deepseek_v3:DeepseekV3TopkRouter"
    scoring_cls = SigmoidGroupScoring
