"""Top-p (dynamic) routing, arXiv 2403.07652: per token, the smallest set of experts whose probability mass
reaches p (the crossing expert included), at most ``max_k``; the raw probabilities are the combine weights.

The probabilities are the family's full distribution over the real experts (softmax, or for sigmoid routers the
sigmoid scores renormalised); group limits and selection bias do not apply, as in the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zeda_lightning.routing.base import BaseRouter, MoEDims, RouterOutput, RoutingVariant, register_routing


class TopPRouter(BaseRouter):
    def __init__(self, dims: MoEDims, scoring, p: float, max_k: int, **kw) -> None:
        super().__init__(dims, scoring, dims.num_experts, **kw)
        self.p = p
        self.max_k = max_k

    def route(self, h: Tensor) -> RouterOutput:
        weight, bias, _ = self._real_logits()
        logits = self.scoring.logits(h, weight, bias)  # (T, N)
        probs = self.scoring.probs(logits)  # (T, N) fp32
        top_p, idx = torch.topk(probs, self.max_k, dim=-1, sorted=True)  # (T, max_k) descending
        # keep expert j while the mass before it is < p: the expert that crosses p is kept
        keep = (top_p.cumsum(dim=-1) - top_p) < self.p
        pad = self.top_k - self.max_k
        idx = torch.nn.functional.pad(idx, (0, pad), value=self.num_experts)
        weights = torch.nn.functional.pad(top_p, (0, pad), value=0.0).to(logits.dtype)
        skip = torch.nn.functional.pad(keep, (0, pad), value=False).logical_not()
        return self._output(logits, weights, idx, skip)


@register_routing("top_p")
class TopP(RoutingVariant):
    """Args:
    p: cumulative-probability threshold in (0, 1] (the paper's default 0.4).
    max_k: most experts per token; ``None`` means the model's K."""

    def __init__(self, p: float = 0.4, max_k: int | None = None) -> None:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"TopP: p must be in (0, 1], got {p}; the paper's default is 0.4")
        if max_k is not None and max_k < 1:
            raise ValueError(f"TopP: max_k must be >= 1, got {max_k}")
        self.p = p
        self.max_k = max_k

    def validate(self, dims: MoEDims) -> None:
        if self.max_k is not None and self.max_k > dims.top_k:
            raise ValueError(
                f"TopP: max_k={self.max_k} exceeds the model's top-k K={dims.top_k}; use max_k <= {dims.top_k} or None"
            )

    def make_router(self, dims: MoEDims, scoring, **kw) -> TopPRouter:
        return TopPRouter(dims, scoring, self.p, self.max_k or dims.top_k, **kw)
