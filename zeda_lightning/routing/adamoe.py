"""AdaMoE (arXiv 2406.13233): M independent null experts, each with its own logit (a separate Linear(H -> M)).

The null-experts router with ``independent=True`` under its own name, so YAML and the registry can pick it; the
number of null slots follows the data sparsity rho as for null experts (M = N (1 - rho) / rho).
"""

from __future__ import annotations

from zeda_lightning.routing.base import register_routing
from zeda_lightning.routing.null_experts import NullExperts


@register_routing("adamoe")
class AdaMoE(NullExperts):
    """Args:
    rho: expected share of slots that go to real experts, in (0, 1].
    seed: seed for the null router init."""

    def __init__(self, rho: float = 0.5, seed: int | None = None) -> None:
        super().__init__(rho=rho, independent=True, seed=seed)
