"""``python -m zeda_lightning {fit,validate,test,predict} --config ...`` (LightningCLI), plus ``generate`` and
``demo``. Modules and data modules are chosen by ``class_path`` in YAML."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from zeda_lightning.data.module import ZedaDataModule
from zeda_lightning.modules.base import TrainModuleBase


class ZedaCLI(LightningCLI):
    """LightningCLI with checks before the trainer writes anything (config, logs, checkpoints), atomic checkpoints,
    one run per output directory, and checkpoints that restore state but never configure the run."""

    def _parse_ckpt_path(self) -> None:
        """LightningCLI merges a checkpoint's hyperparameters into the config and instantiates what they name
        (``optimizer: {class_path: os.system}`` would run). Here the user's YAML and flags decide what runs; a
        checkpoint only restores state, after :meth:`TrainModuleBase.check_resume` accepted it."""

    def _preflight(self) -> None:
        from zeda_lightning.checkpointing import make_checkpoints_atomic
        from zeda_lightning.runlock import RunLock, launching_process

        sub = self.subcommand
        self.model.preflight(self.datamodule)
        ckpt_path = self.config[sub].get("ckpt_path")
        resolved = self.model.check_run(self.trainer, self.datamodule, ckpt_path, stage=sub)
        if ckpt_path is not None:
            self.config_init[sub]["ckpt_path"] = resolved
        if "weights_only" in self.config_init[sub]:
            self.config_init[sub]["weights_only"] = True
        make_checkpoints_atomic(self.trainer)
        if sub == "fit" and launching_process():
            self._lock = RunLock().acquire(self.model.output_dirs(self.trainer))

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:
            lock = getattr(self, "_lock", None)
            if lock is not None:
                lock.release()

    def before_fit(self) -> None:
        self._preflight()

    def before_validate(self) -> None:
        self._preflight()

    def before_test(self) -> None:
        self._preflight()


def cli_main(args: list[str] | None = None, run: bool = True) -> ZedaCLI:
    return ZedaCLI(
        TrainModuleBase,
        ZedaDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from zeda_lightning.demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "estimate":
        from zeda_lightning.estimate import main as estimate_main

        return estimate_main(argv[1:])
    if argv and argv[0] == "consolidate":
        from zeda_lightning.sharding import main as consolidate_main

        return consolidate_main(argv[1:])
    if argv and argv[0] == "budget":
        from zeda_lightning.budget import main as budget_main

        return budget_main(argv[1:])
    if argv and argv[0] == "eval":
        from zeda_lightning.evaluation.harness import main as eval_main

        return eval_main(argv[1:])
    if argv and argv[0] == "generate":
        from zeda_lightning.generate import main as generate_main

        return generate_main(argv[1:])
    cli_main(None if from_command_line else argv)
