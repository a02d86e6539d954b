"""Per-family adapters: swap the router, leave the experts untouched.

Supported ``model_type`` values are the keys of :data:`ADAPTERS`; each lives in its own small file.
"""

from zeda_lightning.adapters import (  # noqa: F401  (registration side effect)
    deepseek_v3,
    dots1,
    ernie4_5_moe,
    flex_olmo,
    glm4_moe,
    glm4_moe_lite,
    gpt_oss,
    granitemoe,
    hunyuan_v1_moe,
    lfm2_moe,
    mixtral,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_moe,
    qwen3_next,
)
from zeda_lightning.adapters.base import (
    ADAPTERS,
    CONFIG_KEY,
    FamilyAdapter,
    adapter_for,
    describe,
    inject,
    register_adapter,
    routing_state_keys,
    set_zero_mask,
)
from zeda_lightning.adapters.skipping import SentinelSkip, install_sentinel_skip

__all__ = [
    "ADAPTERS",
    "CONFIG_KEY",
    "FamilyAdapter",
    "SentinelSkip",
    "adapter_for",
    "describe",
    "inject",
    "install_sentinel_skip",
    "register_adapter",
    "routing_state_keys",
    "set_zero_mask",
]
