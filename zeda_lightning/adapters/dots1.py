"""dots.llm1 (dots1): DeepSeek-V3's rule: fp32 sigmoid scores, group-limited selection on scores +
e_score_correction_bias, unbiased weights renormalised (+1e-20) when norm_topk_prob, times routed_scaling_factor;
shared experts in the block, the first first_k_dense_replace layers dense."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import SigmoidGroupScoring


@register_adapter
class Dots1Adapter(FamilyAdapter):
    model_type = "dots1"
    router_path = "transformers.models.dots1.modeling_dots1:Dots1TopkRouter"
    scoring_cls = SigmoidGroupScoring
