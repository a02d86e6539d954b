"""A routing demo on a tiny random MoE: inject, check exactness, count skipped expert rows.

Run: ``python -m zeda_lightning demo [--family qwen3_moe] [--routing zero_experts]``.
"""

from __future__ import annotations

import argparse
import json

import torch

from zeda_lightning.adapters import describe, inject, set_zero_mask
from zeda_lightning.routing import capture_routing, get_routing
from zeda_lightning.tiny import FAMILIES, tiny_model


def run(family: str = "qwen3_moe", routing: str = "zero_experts", zero_logit_bias: float = 0.0) -> dict:
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
    per_layer = {str(i): round(r.skipped.float().mean().item(), 4) for i, r in sorted(rec.items())}
    skipped = torch.cat([r.skipped.flatten() for r in rec.values()]).float().mean().item()
    return {
        **describe(model),
        "zero_ratio": round(skipped, 4),
        "zero_ratio_per_layer": per_layer,
        "expert_flops_saved": round(skipped, 4),
        "masked_equals_original": exact,
        "max_abs_logit_change_unmasked": round((logits - ref).abs().max().item(), 5),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zeda_lightning demo", description=__doc__)
    parser.add_argument("--family", default="qwen3_moe", choices=FAMILIES, help="tiny model family")
    parser.add_argument("--routing", default="zero_experts", help="registered routing variant name")
    parser.add_argument("--zero-logit-bias", type=float, default=0.0, help="bias on zero-expert logits")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.family, args.routing, args.zero_logit_bias), indent=2))


if __name__ == "__main__":
    main()
