"""ERNIE-4.5-MoE (ernie4_5_moe): fp32 logits with autocast off, softmax, top-k on softmax + correction bias, the
unbiased probabilities renormalised (sum clamped at ``moe_norm_min``) and cast to the hidden states' dtype. The bias
lives in a nested statistics module, shaped (1, N); the injected router keeps its (1, N + N_Z) bias there."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import SoftmaxBiasScoring


@register_adapter
class Ernie4_5_MoeAdapter(FamilyAdapter):
    model_type = "ernie4_5_moe"
    router_path = "transformers.models.ernie4_5_moe.modeling_ernie4_5_moe:Ernie4_5_MoeTopKRouter"
    scoring_cls = SoftmaxBiasScoring
    tensor_homes = {"e_score_correction_bias": "gate.moe_statics.e_score_correction_bias"}
