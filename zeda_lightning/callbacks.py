"""Lightning callbacks that act on injected routers between optimiser steps."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from zeda_lightning.losses.router_losses import GroupBalance, SumOfRouterLosses
from zeda_lightning.routing.longcat_bias import LongCatBiasRouter


class ZeroShareBiasController(L.Callback):
    """LongCat-style controller: at every optimiser step, each ``LongCatBiasRouter`` moves its zero-expert
    selection bias by ``update_rate * sign(target - realised share)`` (no aux loss). The share is counted over every
    micro-batch of the step on every process (the counts are summed across ranks, as torchtitan's aux-loss-free
    balancing does), so all ranks keep the same bias. Logs ``train/zero_bias`` (mean bias over layers) and
    ``train/controller_zero_share``."""

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._routers(pl_module):
            raise ValueError(
                "ZeroShareBiasController found no LongCatBiasRouter in the model; route with "
                "zeda_lightning.routing.LongCatBias, or drop the callback"
            )

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        routers = self._routers(pl_module)
        counts = torch.stack([r.take_counts() for r in routers])  # (L, 2): zero slots, all slots
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        shares = [r.apply_counts(skipped, slots) for r, (skipped, slots) in zip(routers, counts.tolist())]
        shares = [s for s in shares if s is not None]
        if not shares:
            rank_zero_warn("ZeroShareBiasController: no training forward reached the LongCat routers this step "
                           "(are they in eval mode?); their bias is not updated")
            return
        if trainer.logger is not None:
            bias = sum(float(r.zero_selection_bias) for r in routers) / len(routers)
            pl_module.log("train/zero_bias", bias)
            pl_module.log("train/controller_zero_share", sum(shares) / len(shares))

    @staticmethod
    def _routers(pl_module: L.LightningModule) -> list[LongCatBiasRouter]:
        return [m for m in pl_module.modules() if isinstance(m, LongCatBiasRouter)]


class GroupWeightController(L.Callback):
    """Holds the zero-slot share at ``target`` by moving L_GA's ``w`` once per optimiser step:
    ``w <- w * exp(rate * sign(target - share))``, the share counted over the step's training forwards on every
    process (counts summed across ranks, so all ranks keep the same ``w``). A sign step, as LongCat's bias
    controller takes: the share starts far from the target and reaches it with a lag of some steps, and an update
    proportional to the error winds ``w`` up by orders of magnitude over that transient and then oscillates (seen on
    the tiny teacher at rate 0.5 and 2); a step of fixed size cannot.

    Why: ``w N_Z / (w N_Z + N)`` is where L_GA alone puts the share; beside a distillation loss pulling towards the
    teacher's routing the share settles below it and stays there (on the tiny teacher, w = 2 holds 0.44-0.45 from
    step 50 to 200 instead of 0.5), so a fixed ``w`` cannot hit a FLOP budget. The controller leaves alpha (the
    balance pressure) as configured and only finds the ``w`` whose equilibrium is the target; ``w`` is kept in the
    checkpoint, so a resumed run continues from it. Logs ``train/group_w`` and ``train/controller_zero_share``.
    """

    def __init__(self, target: float = 0.5, rate: float = 0.03, max_factor: float = 100.0) -> None:
        if not 0.0 < target < 1.0:
            raise ValueError(f"GroupWeightController: target is a zero-slot share in (0, 1), got {target}")
        if rate <= 0 or max_factor < 1:
            raise ValueError(f"GroupWeightController: rate must be > 0 and max_factor >= 1, got {rate}, {max_factor}")
        self.target, self.rate, self.max_factor = target, rate, max_factor
        self._w: float | None = None  # restored from a checkpoint, applied at fit start
        self._w0: float | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        terms = self._terms(pl_module)
        if not terms:
            raise ValueError("GroupWeightController found no GroupBalance (L_GA) in the module's aux_loss; train with "
                             "aux_loss: group (or a GroupBalance term), or drop the callback")
        self._w0 = terms[0].w if self._w0 is None else self._w0
        if self._w is not None:
            for t in terms:
                t.w = self._w

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        counts = trainer.strategy.reduce(pl_module.take_train_slot_tally(), reduce_op="sum")
        skipped, slots = (float(c) for c in counts)
        if slots == 0:
            rank_zero_warn("GroupWeightController: no training forward was counted this step; w is not updated")
            return
        share = skipped / slots
        terms = self._terms(pl_module)
        w = terms[0].w * math.exp(self.rate * ((share < self.target) - (share > self.target)))
        w = min(max(w, self._w0 / self.max_factor), self._w0 * self.max_factor)
        for t in terms:
            t.w = w
        self._w = w
        if trainer.logger is not None:
            pl_module.log("train/group_w", w)
            pl_module.log("train/controller_zero_share", share)

    @override
    def state_dict(self) -> dict:
        return {"w": self._w, "w0": self._w0}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self._w, self._w0 = state_dict.get("w"), state_dict.get("w0")

    @staticmethod
    def _terms(pl_module: L.LightningModule) -> list[GroupBalance]:
        loss = getattr(pl_module, "router_loss", None)
        terms = loss.terms if isinstance(loss, SumOfRouterLosses) else [loss]
        return [t for t in terms if isinstance(t, GroupBalance)]
