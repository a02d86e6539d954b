"""Static top-K' (K' < K): fewer real experts for every token, no learned skip decision. The matched-FLOPs
baseline: expert FLOPs are K'/K of the original's."""

from __future__ import annotations

from torch import Tensor, nn

from zeda_lightning.routing.base import BaseRouter, MoEDims, RouterOutput, RoutingVariant, register_routing


class StaticTopKRouter(BaseRouter):
    def __init__(self, dims: MoEDims, scoring, k: int, **kw) -> None:
        super().__init__(dims, scoring, dims.num_experts, **kw)
        self.k = k

    def route(self, h: Tensor) -> RouterOutput:
        logits, weights, idx = self._original_route(h, k=self.k)  # (T, N), (T, K'), (T, K')
        pad = self.top_k - self.k
        # the last K - K' slots are sentinel slots, so the output keeps the (T, K) contract
        idx = nn.functional.pad(idx, (0, pad), value=self.num_experts)
        weights = nn.functional.pad(weights, (0, pad), value=0.0)
        return self._output(logits, weights, idx, None)


@register_routing("static_topk")
class StaticTopK(RoutingVariant):
    """Args:
    k: experts per token, 1 <= k < the model's K; the family's own scoring and renormalisation over k slots."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"StaticTopK: k must be >= 1, got {k}")
        self.k = k

    def validate(self, dims: MoEDims) -> None:
        if self.k >= dims.top_k:
            raise ValueError(
                f"StaticTopK: k={self.k} must be smaller than the model's top-k K={dims.top_k}; "
                f"pick k in [1, {dims.top_k - 1}] (k = K * (1 - zero ratio) matches a zero-expert model's FLOPs)"
            )

    def make_router(self, dims: MoEDims, scoring, **kw) -> StaticTopKRouter:
        return StaticTopKRouter(dims, scoring, self.k, **kw)
