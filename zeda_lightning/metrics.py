"""Rank-synced routing metrics (torchmetrics state, summed across processes)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class GroupedRatio(Metric):
    """``sum(numerator_g) / sum(denominator_g)`` for G groups (layers, domains), synced by summing both.

    Used for zero-slot ratios: numerator = skipped slots, denominator = all slots, per layer or per domain.
    Groups that never saw data compute to NaN, and :meth:`seen` says which did.
    """

    full_state_update = False

    def __init__(self, num_groups: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_groups = num_groups
        self.add_state("numerator", default=torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("denominator", default=torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, numerator: Tensor, denominator: Tensor) -> None:  # both (G,)
        self.numerator += numerator.detach().to(self.numerator.device, torch.float64)
        self.denominator += denominator.detach().to(self.denominator.device, torch.float64)

    def compute(self) -> Tensor:
        return (self.numerator / self.denominator).float()  # (G,)

    def seen(self) -> Tensor:
        return self.denominator > 0
