"""Callbacks the safety tests name in YAML (``tests.safety.callbacks.X``): kill a run, hold it, fill the disk."""

from __future__ import annotations

import os
import signal
import time

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL the process when ``step`` optimiser steps are done (after that step's checkpoint was written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class WaitForFile(L.Callback):
    """Hold the run at its first step until ``path`` exists (a second run is started meanwhile)."""

    def __init__(self, path: str, started: str) -> None:
        self.path, self.started = path, started

    def on_train_start(self, trainer, pl_module) -> None:
        open(self.started, "w").close()
        deadline = time.time() + 300
        while not os.path.exists(self.path) and time.time() < deadline:
            time.sleep(0.1)
