"""Lightning callbacks that act on injected routers between optimiser steps."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

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
