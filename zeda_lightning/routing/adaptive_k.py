"""Adaptive-K (entropy-gated top-k, training-free; Balsamo 2026, "Entropy-Guided Dynamic Expert Selection in MoE
Models"): a confident router (low entropy) runs fewer experts, an uncertain one more.

Per token, ``H = -sum_i p_i ln p_i`` over the family's full distribution on the N real experts (softmax, or the
sigmoid scores renormalised, the rule the aux losses and top-p use); ascending thresholds ``h_1 <= ... <= h_m`` pick
``k = k_values[#{j : h_j <= H}]``, so ``H < h_1`` gives the smallest k and ``H >= h_m`` the largest. The token then
routes exactly as the family's own top-k would (group limits, selection bias, renormalisation over its k slots if
the family renormalises), i.e. as :class:`~zeda_lightning.routing.static_topk.StaticTopK` with that token's k, and
the remaining K - k slots are sentinels. A token at k = K routes bit for bit as the original.

Choices (the method is a few lines; the preprint gives thresholds in nats for Mixtral, N = 8):
    - thresholds are fractions of the largest entropy ``ln N`` (dimension-free: one YAML fits any N);
    - one set of thresholds for every layer, as in the preprint's code;
    - the default k_values are 1..K with thresholds evenly spaced at j / K of ln N; the frontier calibrates them to
      a target mean k by scaling that even spacing (``zeda_lightning.solve.bisect_monotone``, see bench/frontier.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from zeda_lightning.routing.base import BaseRouter, MoEDims, RouterOutput, RoutingVariant, register_routing


def routing_entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats of each row of ``probs`` (T, N) -> (T,); ``0 ln 0 = 0``."""
    return torch.special.entr(probs.float()).sum(dim=-1)


def k_per_token(entropy: Tensor, thresholds: Tensor, k_values: Tensor) -> Tensor:
    """``k_values[#{j : thresholds_j <= H_t}]`` for each token: (T,) long. ``thresholds`` (m,) ascending, in nats;
    ``k_values`` (m + 1,) ascending."""
    level = torch.bucketize(entropy, thresholds.to(entropy), right=True)  # (T,) thresholds <= H counted
    return k_values.to(entropy.device)[level]


def even_thresholds(scale: float, num_levels: int) -> list[float]:
    """``scale * j / num_levels`` for j = 1..num_levels - 1 (fractions of ln N): the one-knob family calibrated to a
    target mean k; mean k falls as ``scale`` grows (scale 0: every token at the largest k)."""
    return [scale * j / num_levels for j in range(1, num_levels)]


class AdaptiveKRouter(BaseRouter):
    def __init__(self, dims: MoEDims, scoring, thresholds: list[float], k_values: list[int], **kw) -> None:
        super().__init__(dims, scoring, dims.num_experts, **kw)
        self.k_values = list(k_values)
        self.set_thresholds(thresholds)

    def set_thresholds(self, thresholds: list[float]) -> None:
        """Thresholds as fractions of ln N (calibration sets them in place, no re-injection)."""
        if len(thresholds) != len(self.k_values) - 1 or list(thresholds) != sorted(thresholds):
            raise ValueError(f"AdaptiveK: need {len(self.k_values) - 1} ascending thresholds for k_values "
                             f"{self.k_values}, got {list(thresholds)}")
        self.thresholds = list(thresholds)

    def token_k(self, logits: Tensor) -> Tensor:
        """k for each token (T,) from its routing entropy."""
        entropy = routing_entropy(self.scoring.probs(logits))  # (T,) nats
        nats = torch.tensor(self.thresholds, dtype=torch.float32) * math.log(self.num_experts)  # (m,)
        return k_per_token(entropy, nats, torch.tensor(self.k_values))

    def route(self, h: Tensor) -> RouterOutput:
        n, big_k = self.num_experts, self.top_k
        weight, bias, ecb = self._real_logits()
        logits = self.scoring.logits(h, weight, bias)  # (T, N), the family's own op sequence
        k_tok = self.token_k(logits)  # (T,)
        idx = torch.full((logits.shape[0], big_k), n, dtype=torch.long, device=logits.device)  # (T, K) sentinels
        weights = None
        for k in self.k_values:
            rows = (k_tok == k)[:, None]  # (T, 1)
            sel, scores = self.scoring.select(logits, n, k, ecb)  # (T, k): the family's own top-k
            w = self.scoring.combine(scores, logits.dtype)  # (T, k), its own renorm over k slots
            w = nn.functional.pad(w, (0, big_k - k), value=0.0)
            weights = torch.zeros_like(w) if weights is None else weights
            idx = torch.where(rows, nn.functional.pad(sel, (0, big_k - k), value=n), idx)
            weights = torch.where(rows, w, weights)
        return self._output(logits, weights, idx, None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k_values={self.k_values}, thresholds={self.thresholds}"


@register_routing("adaptive_k")
class AdaptiveK(RoutingVariant):
    """Entropy-gated top-k.

    Args:
        thresholds: ascending entropy thresholds as fractions of ln N, one fewer than ``k_values``; ``None``: evenly
            spaced, j / len(k_values) for j = 1..len(k_values) - 1.
        k_values: the k a token can get, ascending in [1, K]; ``None``: 1..K.
    """

    def __init__(self, thresholds: list[float] | None = None, k_values: list[int] | None = None) -> None:
        if thresholds is not None and (list(thresholds) != sorted(thresholds) or any(t < 0 for t in thresholds)):
            raise ValueError(f"AdaptiveK: thresholds must be ascending and >= 0 (fractions of ln N), got {thresholds}")
        if k_values is not None and (not k_values or list(k_values) != sorted(set(k_values)) or k_values[0] < 1):
            raise ValueError(f"AdaptiveK: k_values must be strictly ascending and >= 1, got {k_values}")
        self.thresholds = None if thresholds is None else [float(t) for t in thresholds]
        self.k_values = None if k_values is None else [int(k) for k in k_values]

    def resolve(self, dims: MoEDims) -> tuple[list[float], list[int]]:
        ks = self.k_values or list(range(1, dims.top_k + 1))
        return (self.thresholds if self.thresholds is not None else even_thresholds(1.0, len(ks))), ks

    def validate(self, dims: MoEDims) -> None:
        thresholds, ks = self.resolve(dims)
        if ks[-1] > dims.top_k:
            raise ValueError(f"AdaptiveK: k_values {ks} exceed the model's top-k K={dims.top_k}; use values in "
                             f"[1, {dims.top_k}]")
        if len(thresholds) != len(ks) - 1:
            raise ValueError(f"AdaptiveK: {len(ks)} k_values need {len(ks) - 1} thresholds, got {thresholds}")

    def make_router(self, dims: MoEDims, scoring, **kw) -> AdaptiveKRouter:
        thresholds, ks = self.resolve(dims)
        return AdaptiveKRouter(dims, scoring, thresholds, ks, **kw)
