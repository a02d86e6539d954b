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
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: str = "cosine",
        warmup_ratio: float = 0.1,
        export_dir: str | None = None,
        export_overwrite: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.warmup_ratio = warmup_ratio
        self.export_dir = export_dir
        self.export_overwrite = export_overwrite

    def preflight(self, datamodule=None) -> None:
        """Checks run by the CLI before the trainer writes anything; raise ``ValueError`` naming the fix."""
        if self.export_dir is not None:
            from zeda_lightning.export import _check_export_target

            _check_export_target(self.export_dir, self.export_overwrite)

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

        model, tokenizer = self.export_model_and_tokenizer()
        if self.trainer.is_global_zero:
            export_model(model, self.export_dir, tokenizer, overwrite=self.export_overwrite)
