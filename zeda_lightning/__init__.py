"""zeda_lightning: make post-trained MoE LLMs skip expert compute (zero experts, null experts, self-distillation)."""

from zeda_lightning.adapters import inject, set_zero_mask
from zeda_lightning.budget import calibrate_zero_bias, set_zero_logit_bias
from zeda_lightning.export import export_model, from_pretrained
from zeda_lightning.sampling import generate_text
from zeda_lightning.routing import (
    NullExperts,
    StaticTopK,
    TopP,
    ZeroExperts,
    capture_routing,
    get_routing,
)

__version__ = "0.1.0"

__all__ = [
    "NullExperts",
    "StaticTopK",
    "TopP",
    "ZeroExperts",
    "calibrate_zero_bias",
    "capture_routing",
    "export_model",
    "from_pretrained",
    "generate_text",
    "get_routing",
    "inject",
    "set_zero_logit_bias",
    "set_zero_mask",
]
