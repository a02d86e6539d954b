"""LongCat-style zero-expert share held by a bias controller, no aux loss (arXiv 2509.01322, after the aux-loss-free
balancing of arXiv 2408.15664).

ZEDA's pool (N real + N_Z zero experts), plus one bias per router added to the zero-expert logits for selection
only: the combine weights use the unbiased scores. After each optimiser step
``bias += update_rate * sign(target - realised zero share)`` (:meth:`LongCatBiasRouter.apply_counts`, called by
``zeda_lightning.callbacks.ZeroShareBiasController`` at each optimiser step), so the share settles at ``target`` without a loss term.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zeda_lightning.routing.scoring import compute_dtype
from zeda_lightning.routing.base import MASKABLE, ZERO_SLOTS, MoEDims, RouterOutput, register_routing
from zeda_lightning.routing.zero_experts import ZeroExpertRouter, ZeroExperts


class LongCatBiasRouter(ZeroExpertRouter):
    #: no zero-logit budget knob: its route ignores ``zero_logit_bias``
    capabilities = frozenset({MASKABLE, ZERO_SLOTS})

    def __init__(self, dims: MoEDims, scoring, num_zero_experts: int, mask_zero: bool, target: float,
                 update_rate: float, **kw) -> None:
        super().__init__(dims, scoring, num_zero_experts, mask_zero, **kw)
        self.target = target
        self.update_rate = update_rate
        #: selection-only bias on every zero-expert logit (saved with the model: inference keeps the share)
        self.zero_selection_bias = nn.Buffer(torch.zeros((), dtype=torch.float32))
        self._skipped = torch.zeros((), dtype=torch.float64)  # zero slots routed in training since the last update
        self._slots = torch.zeros((), dtype=torch.float64)

    def route(self, h: Tensor) -> RouterOutput:
        n = self.num_experts
        if self.mask_zero or self.num_zero_experts == 0:
            return super().route(h)  # the original op sequence
        logits = self.scoring.pool_logits(h, self.weight, self.bias)  # (T, N + N_Z) fp32
        bias = self.zero_selection_bias.to(logits.dtype)
        for_choice = torch.cat([logits[:, :n], logits[:, n:] + bias], dim=-1)  # (T, N + N_Z), selection only
        idx, _ = self._select(for_choice, n, self.top_k, self.e_score_correction_bias)  # (T, K)
        # NOTE: weights from the unbiased scores (LongCat / DeepSeek-V3: the bias never enters the output)
        weights = self.scoring.combine(self.scoring.gather_scores(logits, idx), compute_dtype(h))  # (T, K)
        skip = idx >= n
        if self.training:
            self._skipped = self._skipped.to(skip.device) + skip.sum().detach()
            self._slots = self._slots.to(skip.device) + skip.numel()
        return self._output(logits, weights, idx, skip)

    def take_counts(self) -> Tensor:
        """``(zero slots, all slots)`` routed in training forwards since the last call (float64, (2,)), reset."""
        counts = torch.stack([self._skipped, self._slots.to(self._skipped.device)])
        self._skipped, self._slots = torch.zeros_like(self._skipped), torch.zeros_like(self._slots)
        return counts

    @torch.no_grad()
    def apply_counts(self, skipped: float, slots: float) -> float | None:
        """One controller step from counts (summed over micro-batches and processes); returns their zero share,
        or ``None`` when there were none. Padding tokens count too (packed data has none)."""
        if slots == 0:
            return None
        share = skipped / slots
        step = self.update_rate * (1.0 if self.target > share else -1.0 if self.target < share else 0.0)
        self.zero_selection_bias.add_(step)
        return share

    def update_bias(self) -> float | None:
        """One controller step from this process's own counts (single process use)."""
        skipped, slots = self.take_counts().tolist()
        return self.apply_counts(skipped, slots)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, target={self.target}, update_rate={self.update_rate}"


@register_routing("longcat_bias")
class LongCatBias(ZeroExperts):
    """Zero experts whose share is held at ``target`` by a selection bias (train with aux_loss='none' and the
    ``zeda_lightning.callbacks.ZeroShareBiasController`` callback).

    Args:
        target: zero-slot share to hold, in [0, 1).
        update_rate: bias step per optimiser step (logit units).
        num_zero_experts: N_Z; ``None`` means N // 2.
        mask_zero: start with zero experts masked (the model is then exactly the original).
        seed: seed for the Gaussian init of the new router rows.
    """

    capabilities = LongCatBiasRouter.capabilities

    def __init__(self, target: float = 0.5, update_rate: float = 0.01, num_zero_experts: int | None = None,
                 mask_zero: bool = False, seed: int | None = None) -> None:
        if not 0.0 <= target < 1.0:
            raise ValueError(f"LongCatBias: target must be in [0, 1), got {target}; 0.5 skips half the slots")
        if update_rate <= 0:
            raise ValueError(f"LongCatBias: update_rate must be > 0, got {update_rate}; try 0.01")
        super().__init__(num_zero_experts=num_zero_experts, mask_zero=mask_zero, seed=seed)
        self.target = target
        self.update_rate = update_rate

    def make_router(self, dims: MoEDims, scoring, **kw) -> LongCatBiasRouter:
        return LongCatBiasRouter(dims, scoring, self.resolve_num_zero(dims), self.mask_zero, self.target,
                                 self.update_rate, **kw)
