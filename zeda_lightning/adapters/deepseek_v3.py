"""DeepSeek-V3: fp32 sigmoid scores, group-limited selection (n_group / topk_group) on scores + e_score_correction_bias,
unbiased weights renormalised (+1e-20) times routed_scaling_factor; shared experts in the block."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.adapters.scoring import SigmoidGroupScoring


@register_adapter
class DeepseekV3Adapter(FamilyAdapter):
    model_type = "deepseek_v3"

    def router_class(self):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

        return DeepseekV3TopkRouter

    def scoring(self, router):
        return SigmoidGroupScoring(router.num_group, router.topk_group, router.routed_scaling_factor, router.norm_topk_prob)
