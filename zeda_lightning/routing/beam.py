"""BEAM: Binary Expert Activation Masking (Wu et al., arXiv 2605.14438): the pretrained top-K router kept as is, plus
a light mask router per layer that switches slots of the top-K off.

Following the paper: the mask router is one linear layer on the token's hidden state, one value per expert,
``m_hat = sigmoid(W_m x + b_m)`` (T, N), read at the K selected ids; the binary mask is ``m = [m_hat >= 0.5]``; the
combine weights become ``g * m`` with **no renormalisation** (the paper's ``g_hat = g ⊙ m``), so a token may keep
0..K experts. The threshold is made differentiable with a straight-through estimator: forward uses the hard 0/1
mask, backward the identity onto ``m_hat``. ``W_m`` starts at zero, so the injected model starts as the original
top-K (``m_hat = 0.5`` keeps every slot). Sparsity comes from an L1 term on ``m_hat`` over the top-K slots
(``zeda_lightning.losses.router_losses.BeamSparsity``).

Choices where the paper is silent or our setting differs (documented, not the paper's):
    - the mask router has a bias (``nn.Linear``'s default), zero at the start like ``W_m``;
    - in training, masked slots still run their expert at weight 0 (the paper keeps the top-K compute in training):
      without it, the STE gradient ``dL/dm = <E_j(x), dL/dy> g_j`` of a slot that is off would be 0 and a slot
      could never come back. In eval the masked slots are sentinels and no expert row runs for them. Either way the
      record's ``skipped`` is the mask, so zero ratio and FLOP accounting read the same in both modes;
    - ``mask_zero`` (MASKABLE) switches the mask router off: the exact original routing (rows frozen by
      :meth:`BeamRouter.freeze_original_rows` for a shared-weights teacher);
    - routing replay replays the pool ids; the mask is recomputed from the current mask router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zeda_lightning.routing.base import (
    MASKABLE,
    BaseRouter,
    MoEDims,
    RouterOutput,
    RoutingVariant,
    register_routing,
)

#: a slot is kept when its mask probability is at least this (the paper's T = 0.5, its best in the ablation)
THRESHOLD = 0.5


@dataclass
class BeamRouterOutput(RouterOutput):
    """A BEAM layer's record: the routing, plus the mask probabilities the sparsity loss reads."""

    mask_probs: Tensor | None = None  # (T, K) fp32 m_hat at the selected ids, with gradient
    kept: Tensor | None = None  # (T, K) bool hard mask

    @property
    def skipped(self) -> Tensor:
        sentinel = self.selected_experts >= self.num_experts  # (T, K)
        return sentinel if self.kept is None else sentinel | ~self.kept


def straight_through_mask(probs: Tensor, threshold: float = THRESHOLD) -> Tensor:
    """Hard 0/1 mask in the forward, gradient 1 onto ``probs`` in the backward. ``probs - probs.detach()`` is an
    exact 0, so the forward value is exactly 0.0 or 1.0 (bit-identical weights where the mask keeps a slot)."""
    hard = (probs >= threshold).to(probs.dtype)
    return hard + (probs - probs.detach())


class BeamRouter(BaseRouter):
    """The family's top-K over the N real experts, masked per slot by a sigmoid mask router (W_m (N, H), b_m (N,))."""

    capabilities = frozenset({MASKABLE})

    def __init__(self, dims: MoEDims, scoring, mask_zero: bool, **kw) -> None:
        super().__init__(dims, scoring, dims.num_experts, **kw)
        #: True: the mask router is off and the original op sequence runs (bit-identical teacher)
        self.mask_zero = mask_zero
        self.mask_weight = nn.Parameter(torch.zeros(dims.num_experts, dims.hidden_size))  # (N, H): W_m
        self.mask_bias = nn.Parameter(torch.zeros(dims.num_experts))  # (N,): b_m
        self._frozen_rows: tuple[Tensor, Tensor | None, Tensor | None] | None = None

    def freeze_original_rows(self) -> None:
        """Keep a copy of the real-expert rows for the masked path (shared-weights teacher), as zero experts do."""
        self._frozen_rows = tuple(None if t is None else t.detach().clone() for t in self._real_logits())

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self._frozen_rows is not None:  # follow .to(device) like a buffer, outside the state dict
            self._frozen_rows = tuple(None if t is None else fn(t) for t in self._frozen_rows)
        return out

    def mask_probabilities(self, h: Tensor) -> Tensor:
        """``sigmoid(W_m x + b_m)`` over every expert, (T, N) fp32 (autocast off, as for the pool logits)."""
        return self.scoring.pool_logits(h, self.mask_weight, self.mask_bias).sigmoid()

    def route(self, h: Tensor) -> RouterOutput:
        if self.mask_zero:
            logits, weights, idx = self._original_route(h, rows=self._frozen_rows)  # (T, N), (T, K), (T, K)
            return self._output(logits, weights, idx, None)
        weight, bias, ecb = self._real_logits()
        logits = self.scoring.logits(h, weight, bias)  # (T, N), the family's own op sequence
        idx, top_scores = self._select(logits, self.num_experts, self.top_k, ecb)  # (T, K)
        weights = self.scoring.combine(top_scores, logits.dtype)  # (T, K), the original top-K weights g
        mask_probs = self.mask_probabilities(h).gather(1, idx)  # (T, K) m_hat at the selected ids
        mask = straight_through_mask(mask_probs)  # (T, K) exactly 0 / 1 forward, identity backward
        kept = mask_probs.detach() >= THRESHOLD
        # NOTE: g_hat = g ⊙ m, no renormalisation over the kept slots (paper)
        weights = weights * mask.to(weights.dtype)
        # in training an off slot still runs at weight 0 (its STE gradient needs E_j(x)); in eval it is a sentinel
        out = self._output(logits, weights, idx, None if self.training else ~kept)
        return BeamRouterOutput(out.router_logits, out.routing_weights, out.selected_experts, out.pool_indices,
                                out.num_experts, out.score_func, mask_probs=mask_probs, kept=kept)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_zero={self.mask_zero}"


@register_routing("beam")
class Beam(RoutingVariant):
    """BEAM binary expert activation masking; train with ``aux_loss=BeamSparsity(...)`` (the paper's L1 term).

    Args:
        mask_zero: start with the mask router off (the model is then exactly the original).
    """

    capabilities = BeamRouter.capabilities

    def __init__(self, mask_zero: bool = False) -> None:
        self.mask_zero = mask_zero

    def make_router(self, dims: MoEDims, scoring, **kw) -> BeamRouter:
        return BeamRouter(dims, scoring, self.mask_zero, **kw)
