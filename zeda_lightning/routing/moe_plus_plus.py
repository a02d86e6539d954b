"""MoE++ zero-computation experts (Jin et al., arXiv 2410.07348): zero, copy and constant experts in the pool.

Pool layout: ``[0, N)`` real FFN experts, then ``num_zero`` zero experts (output 0), ``num_copy`` copy experts
(output x) and ``num_constant`` constant experts (output ``a1 x + a2 v_c``, ``(a1, a2) = softmax(W_c x)``, learned
``v_c``). None of them runs an expert GEMM: every such slot is a sentinel for the experts module, and the copy and
constant outputs, weighted like any slot, are added to the experts' output by the skip hook (``SentinelSkip``).
Optional gating residual: ``logits_j = W_j x + W_g logits_{j-1}`` (previous MoE layer's logits, ``W_g`` (P, P)
starting at 0 so the injected model routes like the plain one).

The router is a :class:`ZeroExpertRouter` whose "zero experts" are all the zero-computation experts, so the ZEDA
machinery applies unchanged: ``mask_zero`` gives the exact original model, and L_GA with ``w`` targets their share
(``w N_zc / (w N_zc + N)``), standing in for MoE++'s tau-weighted heterogeneous balance loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zeda_lightning.routing.scoring import compute_dtype
from zeda_lightning.routing.base import MASKABLE, ZERO_SLOTS, MoEDims, RouterOutput, register_routing
from zeda_lightning.routing.zero_experts import ZeroExpertRouter, ZeroExperts


class MoEPlusPlusRouter(ZeroExpertRouter):
    """Family scoring over N + N_zc rows, top-K unchanged; zero-computation slots are sentinels whose (copy,
    constant) outputs are handed to the experts' skip hook."""

    #: no zero-logit budget knob: its route ignores ``zero_logit_bias``
    capabilities = frozenset({MASKABLE, ZERO_SLOTS})

    def __init__(self, dims: MoEDims, scoring, num_zero: int, num_copy: int, num_constant: int,
                 gating_residual: bool, mask_zero: bool, **kw) -> None:
        super().__init__(dims, scoring, num_zero + num_copy + num_constant, mask_zero, **kw)
        self.num_zero, self.num_copy, self.num_constant = num_zero, num_copy, num_constant
        pool, h = self.weight.shape
        self.const_gate = nn.Parameter(torch.zeros(num_constant, 2, h))  # (C, 2, H): (a1, a2) = softmax(W_c x)
        self.const_vectors = nn.Parameter(torch.zeros(num_constant, h))  # (C, H): v_c
        self.residual_gate = nn.Parameter(torch.zeros(pool, pool)) if gating_residual else None  # (P, P): W_g
        self._previous: tuple[MoEPlusPlusRouter, ...] = ()  # the previous MoE layer's router (not a submodule)
        self._skip_hook: tuple = ()  # the experts' SentinelSkip that adds copy / constant outputs
        self._last_logits: Tensor | None = None

    def connect(self, previous: MoEPlusPlusRouter | None, skip_hook) -> None:
        self._previous = () if previous is None else (previous,)
        self._skip_hook = (skip_hook,)

    def _hand_off(self, addend: Tensor | None) -> None:
        if self._skip_hook:
            self._skip_hook[0].set_addend(addend)

    def route(self, h: Tensor) -> RouterOutput:
        n = self.num_experts
        if self.mask_zero or self.num_zero_experts == 0:
            self._last_logits = None
            self._hand_off(None)
            return super().route(h)  # the original op sequence, nothing to add
        logits = self.scoring.pool_logits(h, self.weight, self.bias)  # (T, P) fp32
        prev = self._previous[0]._last_logits if self._previous else None
        if self.residual_gate is not None and prev is not None and prev.shape == logits.shape:
            # NOTE: MoE++ gating residual G_j = W_j x + W_g G_{j-1}
            logits = logits + prev.to(logits.dtype) @ self.residual_gate.T.to(logits.dtype)
        self._last_logits = logits
        idx, top_scores = self._select(logits, n, self.top_k, self.e_score_correction_bias)  # (T, K)
        weights = self.scoring.combine(top_scores, compute_dtype(h))  # (T, K), renorm over all K slots
        self._hand_off(self.zero_gemm_output(h, idx, weights))
        return self._output(logits, weights, idx, idx >= n)

    def zero_gemm_output(self, h: Tensor, idx: Tensor, weights: Tensor) -> Tensor | None:
        """Weighted sum of the copy and constant slots' outputs ``(T, H)``, or ``None`` if no token picked one."""
        first_copy = self.num_experts + self.num_zero
        first_const = first_copy + self.num_copy
        if not bool((idx >= first_copy).any()):
            return None
        pool_w = weights.new_zeros(idx.shape[0], self.weight.shape[0]).scatter_add(1, idx, weights)  # (T, P)
        out = pool_w[:, first_copy:first_const].sum(-1, keepdim=True).to(h.dtype) * h  # copy: w * x
        if self.num_constant:
            a = torch.softmax(torch.einsum("th,cjh->tcj", h, self.const_gate.to(h.dtype)), dim=-1)  # (T, C, 2)
            const = a[..., :1] * h[:, None] + a[..., 1:] * self.const_vectors.to(h.dtype)  # (T, C, H)
            out = out + torch.einsum("tc,tch->th", pool_w[:, first_const:].to(h.dtype), const)
        return out  # (T, H)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, zero={self.num_zero}, copy={self.num_copy}, constant={self.num_constant}, "
                f"gating_residual={self.residual_gate is not None}")


@register_routing("moe_plus_plus")
class MoEPlusPlus(ZeroExperts):
    """MoE++ zero-computation experts (paper's small models: 1 zero, 1 copy, 2 constant experts).

    Args:
        num_zero: zero experts (output 0).
        num_copy: copy experts (output x).
        num_constant: constant experts (output a1 x + a2 v, learned v and (a1, a2) = softmax(W_c x)).
        gating_residual: add ``W_g`` times the previous MoE layer's router logits (W_g starts at 0).
        mask_zero: start with every zero-computation expert masked (the model is then exactly the original).
        seed: seed for the Gaussian init of the new router rows.
    """

    capabilities = MoEPlusPlusRouter.capabilities

    def __init__(self, num_zero: int = 1, num_copy: int = 1, num_constant: int = 2, gating_residual: bool = False,
                 mask_zero: bool = False, seed: int | None = None) -> None:
        counts = {"num_zero": num_zero, "num_copy": num_copy, "num_constant": num_constant}
        bad = {k: v for k, v in counts.items() if v < 0}
        if bad or sum(counts.values()) == 0:
            raise ValueError(f"MoEPlusPlus: expert counts must be >= 0 with at least one in total, got {counts}; "
                             "the paper's small models use num_zero=1, num_copy=1, num_constant=2")
        super().__init__(num_zero_experts=sum(counts.values()), mask_zero=mask_zero, seed=seed)
        self.num_zero, self.num_copy, self.num_constant = num_zero, num_copy, num_constant
        self.gating_residual = gating_residual

    def make_router(self, dims: MoEDims, scoring, **kw) -> MoEPlusPlusRouter:
        return MoEPlusPlusRouter(dims, scoring, self.num_zero, self.num_copy, self.num_constant,
                                 self.gating_residual, self.mask_zero, **kw)

    def connect(self, routers, skip_hooks) -> None:
        """Chain each router to the previous MoE layer's (gating residual) and to its experts' skip hook."""
        previous = None
        for router, hook in zip(routers, skip_hooks):
            router.connect(previous, hook)
            previous = router
