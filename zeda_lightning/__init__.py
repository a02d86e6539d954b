"""zeda_lightning: make post-trained MoE LLMs skip expert compute (zero experts, null experts, self-distillation)."""

from zeda_lightning.adapters import inject, set_zero_mask
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
    "capture_routing",
    "get_routing",
    "inject",
    "set_zero_mask",
]
