"""ERNIE-4.5-MoE (ernie4_5_moe): not supported; injecting raises a ValueError.

Its router selects on ``softmax + e_score_correction_bias``, but the bias is not the router's own: it is a (1, N)
parameter of a nested ``Ernie4_5_MoeStatics`` module (``gate.moe_statics.e_score_correction_bias``). ``inject``
reads, grows and maps only the router's own ``e_score_correction_bias``, so the new router would select without the
bias: the masked model would not be the original, and the checkpoint's key could not be kept.
"""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter


@register_adapter
class Ernie4_5_MoeAdapter(FamilyAdapter):
    model_type = "ernie4_5_moe"
    router_path = "transformers.models.ernie4_5_moe.modeling_ernie4_5_moe:Ernie4_5_MoeTopKRouter"
    unsupported = (
        "ernie4_5_moe is not supported: its router's correction bias lives in a nested module "
        "(gate.moe_statics.e_score_correction_bias, shape (1, N)), not on the router, so the injected router would "
        "select without it and the masked model would not reproduce the original"
    )
