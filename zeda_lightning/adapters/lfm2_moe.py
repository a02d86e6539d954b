"""LFM2-MoE (lfm2_moe): sigmoid scores, top-k on scores + ``expert_bias``, the unbiased scores renormalised (+1e-6)
when ``norm_topk_prob``, times ``routed_scaling_factor``. The bias is a buffer of the MoE block (``feed_forward``),
passed to the router at each call; the injected router keeps its grown bias there and reads it from the block."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import SigmoidTopKScoring


@register_adapter
class Lfm2MoeAdapter(FamilyAdapter):
    model_type = "lfm2_moe"
    router_path = "transformers.models.lfm2_moe.modeling_lfm2_moe:Lfm2MoeTopKRouter"
    scoring_cls = SigmoidTopKScoring
    tensor_homes = {"e_score_correction_bias": "expert_bias"}
