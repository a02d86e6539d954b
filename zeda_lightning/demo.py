"""A routing demo on a tiny random MoE: inject, check exactness, count skipped expert rows.

Run: ``python -m zeda_lightning demo [--family qwen3_moe] [--routing zero_experts]``.
"""

from __future__ import annotations

from typing import Literal

import torch

from zeda_lightning.adapters import describe, inject, set_zero_mask
from zeda_lightning.analysis import zero_ratio
from zeda_lightning.routing import capture_routing, get_routing
from zeda_lightning.tiny import FAMILIES, tiny_model


#: the tiny families, as a type: the command refuses another name before building anything
Family = Literal[FAMILIES]


def demo_main(family: Family = "qwen3_moe", routing: str = "zero_experts", zero_logit_bias: float = 0.0) -> dict:
    """Inject a routing variant into a tiny random MoE: masked exactness and skipped expert slots.

    Args:
        family: tiny model family.
        routing: registered routing variant name (e.g. zero_experts, null_experts, top_p).
        zero_logit_bias: bias added to the zero-expert logits (more skipping when positive).
    """
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    original = tiny_model(family)
    with torch.no_grad():
        ref = original(ids).logits
    model = inject(tiny_model(family), get_routing(routing))
    for router in model.modules():
        if hasattr(router, "zero_logit_bias"):
            router.zero_logit_bias = zero_logit_bias
    with torch.no_grad(), capture_routing(model) as rec:
        logits = model(ids).logits
    exact = None
    if set_zero_mask(model, True):
        with torch.no_grad():
            exact = bool(torch.equal(model(ids).logits, ref))
        set_zero_mask(model, False)
    per_layer = {str(i): round(zero_ratio([r]).item(), 4) for i, r in sorted(rec.items())}
    skipped = zero_ratio(rec).item()
    return {
        **describe(model),
        "zero_ratio": round(skipped, 4),
        "zero_ratio_per_layer": per_layer,
        "expert_flops_saved": round(skipped, 4),
        "masked_equals_original": exact,
        "max_abs_logit_change_unmasked": round((logits - ref).abs().max().item(), 5),
    }


__all__ = ["Family", "demo_main"]
