"""Null experts (Kilian et al., arXiv 2601.15370): data sparsity rho composed with weight sparsity.

M = N (1 - rho) / rho null slots share one learned null logit (or, AdaMoE style, M independent logits); top-K over
the union; null slots output 0 and the combine weights are renormalised over the selected real experts only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zeda_lightning.routing.scoring import compute_dtype
from zeda_lightning.routing.base import (
    BaseRouter,
    MoEDims,
    RouterOutput,
    RoutingVariant,
    copy_original_rows,
    gaussian_rows_like,
    register_routing,
)


class NullExpertRouter(BaseRouter):
    def __init__(self, dims: MoEDims, scoring, num_null: int, independent: bool, **kw) -> None:
        super().__init__(dims, scoring, dims.num_experts, **kw)
        self.num_null = num_null
        self.independent = independent
        rows = num_null if independent else min(num_null, 1)
        self.null_weight = nn.Parameter(torch.zeros(rows, dims.hidden_size))  # (1 or M, H)

    def route(self, h: Tensor) -> RouterOutput:
        n = self.num_experts
        if self.num_null == 0:  # rho = 1: an ordinary MoE, the original op sequence
            logits, weights, idx = self._original_route(h)
            return self._output(logits, weights, idx, None)
        real_logits = self.scoring.pool_logits(h, self.weight, self.bias)  # (T, N) fp32
        null_logits = self.scoring.pool_logits(h, self.null_weight)  # (T, 1) or (T, M) fp32
        if not self.independent:
            # NOTE: one logit copied M times == a null entry with log-prior ln M in a softmax over N + 1.
            null_logits = null_logits.expand(-1, self.num_null)
        logits = torch.cat([real_logits, null_logits], dim=-1)  # (T, N + M)
        ecb = self.e_score_correction_bias
        if ecb is not None:  # selection bias for real experts only; null slots have none
            ecb = torch.cat([ecb, ecb.new_zeros(self.num_null)])
        idx, top_scores = self._select(logits, n, self.top_k, ecb)  # (T, K)
        real = idx < n
        # NOTE: renormalise over the selected real experts only; a token with every slot null gets exactly 0.
        weights = self.scoring.combine(top_scores, compute_dtype(h), norm_mask=real)
        return self._output(logits, weights, idx, ~real)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, M={self.num_null}, independent={self.independent}"


@register_routing("null_experts")
class NullExperts(RoutingVariant):
    """Null experts.

    Args:
        rho: data sparsity in (0, 1], the expected share of slots that go to real experts (1 = ordinary MoE).
        independent: M independent null logits (AdaMoE) instead of one shared logit.
        seed: seed for the null router init (``None``: torch's global RNG).
    """

    def __init__(self, rho: float = 0.5, independent: bool = False, seed: int | None = None) -> None:
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"NullExperts: rho must be in (0, 1], got {rho}; rho = 0.5 routes half the slots to null")
        self.rho = rho
        self.independent = independent
        self.seed = seed

    def num_null(self, dims: MoEDims) -> int:
        return int(round(dims.num_experts * (1.0 - self.rho) / self.rho))

    def make_router(self, dims: MoEDims, scoring, **kw) -> NullExpertRouter:
        return NullExpertRouter(dims, scoring, self.num_null(dims), self.independent, **kw)

    def init_router(self, router: NullExpertRouter, original: nn.Module, generator) -> None:
        copy_original_rows(router, original, generator)
        if router.null_weight.numel():  # null logits start on the scale of the real ones
            router.null_weight.data = gaussian_rows_like(original.weight, router.null_weight.shape[0], generator)
