"""What every training module here shares: optimiser from the CLI, warm-up + schedule from transformers, export."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from transformers import get_scheduler
from typing_extensions import override

from zeda_lightning.analysis import stacked_skips
from zeda_lightning.checkpointing import check_finite_state, checkpoint_meta, resolve_last
from zeda_lightning.export import check_export_target, export_model
from zeda_lightning.sharding import check_strategy, gather_for_export, is_sharded


class TrainModuleBase(L.LightningModule):
    """Args:
    optimizer: optimiser class (YAML ``class_path`` + ``init_args``), called with the trainable parameters.
    lr_schedule: a ``transformers.get_scheduler`` name: "cosine" (the paper), "linear", "constant_with_warmup"...
    warmup_ratio: share of the optimiser steps spent warming up.
    export_dir: write the trained model here in transformers format at the end of fit (atomically).
    export_overwrite: replace a non-empty ``export_dir`` (otherwise fit refuses to start).
    activation_checkpointing: recompute each decoder layer in backward (transformers' gradient checkpointing):
        activation memory of one layer instead of all, for about a third more compute.
    global_batch_size: sequences per optimiser step over all processes; gradient accumulation is derived from it
        (``global / (world size x data.batch_size)``, which must divide), so one YAML runs on any GPU count, from
        the command line or from ``Trainer.fit(module, datamodule)`` alike.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: str = "cosine",
        warmup_ratio: float = 0.1,
        export_dir: str | None = None,
        export_overwrite: bool = False,
        activation_checkpointing: bool = False,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.warmup_ratio = warmup_ratio
        self.export_dir = export_dir
        self.export_overwrite = export_overwrite
        self.activation_checkpointing = activation_checkpointing
        if global_batch_size is not None and global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        self.global_batch_size = global_batch_size

    def preflight(self, datamodule=None) -> None:
        """Checks run by the CLI before the trainer writes anything; raise ``ValueError`` naming the fix."""

    def protected_paths(self, trainer) -> list[str]:
        """Directories an export must never replace or contain: the run's checkpoints and logs (subclasses add
        their model sources)."""
        paths = [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        for logger in trainer.loggers:
            for attr in ("log_dir", "save_dir"):
                with contextlib.suppress(Exception):
                    value = getattr(logger, attr)
                    if isinstance(value, str):
                        paths.append(value)
        return paths

    def output_dirs(self, trainer) -> list[str]:
        """Directories this run writes and must own alone (locked by the CLI): checkpoints and the export."""
        paths = [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        return paths + ([self.export_dir] if self.export_dir else [])

    def check_run(self, trainer, datamodule=None, ckpt_path: str | None = None, stage: str = "fit") -> str | None:
        """Checks of the strategy, schedule, export target and resumed checkpoint, run by the CLI in the launching
        process before any process group exists; sets ``trainer.accumulate_grad_batches`` from
        ``global_batch_size``. Returns the checkpoint to resume from (``last`` resolved to a complete one)."""
        self._apply_global_batch(trainer, datamodule)
        if stage == "fit":
            check_schedule(trainer)
            if self.export_dir is not None:
                check_export_target(self.export_dir, self.export_overwrite, protected=self.protected_paths(trainer))
        if ckpt_path is None:
            return None
        path = _resolve_ckpt_path(trainer, ckpt_path)
        if path is not None and os.path.exists(path):
            self.check_resume(path)
        return path

    def _apply_global_batch(self, trainer, datamodule) -> None:
        trainer.accumulate_grad_batches = check_strategy(trainer, getattr(datamodule, "batch_size", None),
                                                         self.global_batch_size)

    @override
    def setup(self, stage: str) -> None:
        """``global_batch_size`` applied however the run was launched (the CLI checks it earlier, in the launching
        process, to fail before anything is written)."""
        if stage == "fit" and self.global_batch_size is not None:
            self._apply_global_batch(self.trainer, self.trainer.datamodule)

    def check_resume(self, path: str) -> None:
        """Refuse to resume from a checkpoint that does not fit this run; subclasses name what must match."""
        checkpoint_meta(path)

    # -- divergence --------------------------------------------------------------------------------------------
    def check_finite(self, terms: dict[str, Tensor], detail=None) -> None:
        """Stop the run, before backward, when a loss term is NaN or inf (on any rank): the step and the term are
        named; ``detail(name)`` may say more (which layer). Nothing after this step is trained or written."""
        bad = [name for name, t in terms.items() if not bool(torch.isfinite(t.detach()).all())]
        trainer = getattr(self, "_trainer", None)
        strategy = trainer.strategy if trainer is not None else None
        any_bad = strategy.reduce_boolean_decision(bool(bad), all=False) if strategy is not None else bool(bad)
        if not any_bad:
            return
        if not bad:
            raise DivergenceError(f"step {self.global_step}: the loss is non-finite on another rank; see its error")
        where = "; ".join(f"{name} loss = {float(terms[name].detach().float().reshape(-1)[0])}"
                          + (f" ({detail(name)})" if detail is not None and detail(name) else "") for name in bad)
        raise DivergenceError(
            f"training diverged at step {self.global_step}: {where}. Nothing from this step was applied or saved; "
            "lower the learning rate or check the data, then resume from the last checkpoint (--ckpt_path last)")

    def _trained_model(self) -> nn.Module | None:
        """The model whose weights are trained (checked for NaN before a checkpoint or an export)."""
        for name in ("student", "model"):
            model = getattr(self, name, None)
            if isinstance(model, nn.Module):
                return model
        return None

    def nonfinite_weights(self, named_tensors, what: str) -> tuple[FloatingPointError | None, bool]:
        """This process's error for NaN / inf in ``named_tensors`` (``None`` if they are finite), and whether any
        process found one (a collective when a trainer runs: every rank must call it)."""
        error = None
        try:
            check_finite_state(named_tensors, what)
        except FloatingPointError as err:
            error = err
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return error, error is not None
        return error, trainer.strategy.reduce_boolean_decision(error is not None, all=False)

    def _check_weights(self, what: str) -> None:
        model = self._trained_model()
        if model is None:
            return
        error, anywhere = self.nonfinite_weights(model.named_parameters(), what)
        if anywhere and getattr(self, "_trainer", None) is not None:
            raise DivergenceError(f"step {self.global_step}: {error or what + ': NaN or inf on another rank'}; "
                                  "nothing was written; resume from the last checkpoint with a lower learning rate")
        if error is not None:
            raise DivergenceError(str(error))

    @override
    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        bad = bool(local) and not bool(torch.isfinite(torch.stack([torch.linalg.vector_norm(g.float()) for g in local])).all())
        if self._trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise DivergenceError(
                f"training diverged at step {self.global_step}: the gradients hold NaN or inf (loss was finite). "
                "Nothing from this step was applied or saved; lower the learning rate, then resume from the last "
                "checkpoint (--ckpt_path last)")

    def tally_train_slots(self, records, token_mask: Tensor) -> None:
        """Add one training forward's skipped and all (token, slot) pairs to the tally a controller callback takes
        once per optimiser step (:meth:`take_train_slot_tally`)."""
        skipped = stacked_skips(records)[:, token_mask.reshape(-1).bool()]  # (L, T', K)
        counts = torch.stack([skipped.sum(), torch.tensor(skipped.numel(), device=skipped.device)]).double()
        tally = getattr(self, "_train_slot_tally", None)
        self._train_slot_tally = counts if tally is None else tally + counts

    def take_train_slot_tally(self) -> Tensor:
        """``[skipped, all]`` (token, slot) pairs of this process's training forwards since the last take (zeros
        when none ran), then reset."""
        tally = getattr(self, "_train_slot_tally", None)
        self._train_slot_tally = None
        return torch.zeros(2, dtype=torch.float64, device=self.device) if tally is None else tally

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_weights(f"not saving checkpoint at step {self.global_step}: the trained weights")

    @override
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_scheduler(
            self.lr_schedule, optimizer, num_warmup_steps=int(self.warmup_ratio * total), num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def export_model_and_tokenizer(self):
        """``(model, tokenizer)`` to write at the end of fit; subclasses say which model."""
        raise NotImplementedError

    @override
    def on_fit_end(self) -> None:
        if self.export_dir is None:
            return
        self._check_weights(f"not exporting to {self.export_dir}: the trained weights")
        model, tokenizer = self.export_model_and_tokenizer()
        if is_sharded(model):  # every rank gives its shards; rank 0 assembles the full model on CPU
            model = gather_for_export(model, self.trainer.global_rank)
        if self.trainer.is_global_zero:
            export_model(model, self.export_dir, tokenizer, overwrite=self.export_overwrite,
                         protected=self.protected_paths(self.trainer))
        self.trainer.strategy.barrier("export")


class DivergenceError(FloatingPointError):
    """A loss, gradient, weight or metric went NaN / inf: the run stops before anything is written from it."""


def check_schedule(trainer) -> None:
    """A fit that trains nothing (``max_steps: 0``) would export an untrained student over a good one."""
    steps, epochs = trainer.max_steps, trainer.max_epochs
    if steps == 0 or (steps is not None and steps < -1):
        raise ValueError(f"trainer.max_steps must be >= 1 (or -1 with max_epochs set), got {steps}; "
                         "a fit must train at least one step")
    if steps == -1 and epochs is not None and epochs == 0:
        raise ValueError("trainer.max_epochs is 0 and max_steps is unset: the fit would train nothing; set either")
    if trainer.limit_train_batches == 0:
        raise ValueError("trainer.limit_train_batches is 0: the fit would train nothing")


def _resolve_ckpt_path(trainer, ckpt_path: str) -> str | None:
    """The checkpoint ``--ckpt_path`` names: ``last`` = the newest complete ``last*`` checkpoint of the checkpoint
    callbacks (a truncated one, from a full disk or a kill, is skipped with a warning); ``None`` if none exists."""
    if ckpt_path in ("best", "hpc", "registry"):
        return ckpt_path
    if ckpt_path == "last":
        dirs = [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        path, skipped = resolve_last(dirs)
        for bad in skipped:
            rank_zero_warn(f"skipping incomplete checkpoint {bad} (truncated or half-written)")
        if path is None:
            rank_zero_warn(f"--ckpt_path last: no complete last checkpoint in {dirs}; starting from step 0")
        return path
    if not os.path.exists(ckpt_path):
        raise ValueError(f"--ckpt_path {ckpt_path} does not exist; give an existing checkpoint file or directory")
    return ckpt_path
