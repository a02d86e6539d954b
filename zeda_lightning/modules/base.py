"""What every training module here shares: optimiser from the CLI, warm-up + schedule from transformers, export."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from typing_extensions import override


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
        (``global / (world size x data.batch_size)``, which must divide), so one YAML runs on any GPU count.
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
        if self.export_dir is not None:
            from zeda_lightning.export import _check_export_target

            _check_export_target(self.export_dir, self.export_overwrite)

    def check_run(self, trainer, datamodule=None, ckpt_path: str | None = None) -> None:
        """Checks of the strategy, batch and resumed checkpoint, run by the CLI in the launching process before
        any process group exists; sets ``trainer.accumulate_grad_batches`` from ``global_batch_size``."""
        from zeda_lightning import sharding

        micro = getattr(datamodule, "batch_size", None)
        trainer.accumulate_grad_batches = sharding.check_strategy(trainer, micro, self.global_batch_size)
        if ckpt_path is not None:
            path = _resolve_ckpt_path(trainer, ckpt_path)
            if path is not None:
                self.check_resume(sharding.checkpoint_hparams(path), path)

    def check_resume(self, hparams: dict, path: str) -> None:
        """Refuse to resume from a checkpoint whose model structure differs; subclasses name what must match."""

    @override
    def configure_optimizers(self):
        from transformers import get_scheduler

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
        from zeda_lightning.export import export_model

        from zeda_lightning import sharding

        model, tokenizer = self.export_model_and_tokenizer()
        if sharding.is_sharded(model):  # every rank gives its shards; rank 0 assembles the full model on CPU
            model = sharding.gather_for_export(model, self.trainer.global_rank)
        if self.trainer.is_global_zero:
            export_model(model, self.export_dir, tokenizer, overwrite=self.export_overwrite)
        self.trainer.strategy.barrier("export")


def _resolve_ckpt_path(trainer, ckpt_path: str) -> str | None:
    """The checkpoint ``--ckpt_path`` names (``last`` = the checkpoint callbacks' last one), if it exists yet."""
    import os

    if ckpt_path in ("best", "hpc", "registry"):
        return None
    if ckpt_path == "last":
        paths = [os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
                 for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None) and cb.CHECKPOINT_NAME_LAST]
        paths = [p for p in paths if os.path.exists(p)]
        return max(paths, key=os.path.getmtime) if paths else None
    if not os.path.exists(ckpt_path):
        raise ValueError(f"--ckpt_path {ckpt_path} does not exist; give an existing checkpoint file or directory")
    return ckpt_path
