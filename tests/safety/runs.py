"""Short runs of the real CLI for the safety tests: a YAML like the shipped ones, run in a subprocess or in-process."""

from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args: str, cwd: str = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m zeda_lightning ARGS`` as a user runs it (one thread, offline)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, "-m", "zeda_lightning", *args], cwd=cwd, capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("zeda_lightning: error:")]


def write_config(path, root, teacher: str, data: dict, *, steps: int = 4, every: int | None = 2, batch: int = 4,
                 max_length: int = 32, callbacks=(), model: dict | None = None, trainer: dict | None = None,
                 export: bool = True) -> str:
    """A stage-1 YAML (forward KL + L_GA) writing everything under ``root``."""
    root = str(root)
    ckpt = {"dirpath": os.path.join(root, "ckpt"), "save_last": True, "save_top_k": 0}
    if every:
        ckpt["every_n_train_steps"] = every
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": steps, "val_check_interval": steps,
            "check_val_every_n_epoch": None, "limit_val_batches": 2, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": root,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": root, "name": "logs"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": ckpt}, *callbacks],
            **(trainer or {}),
        },
        "model": {
            "class_path": "zeda_lightning.modules.ZedaDistillModule",
            "init_args": {
                "teacher": teacher, "objective": "forward_kl", "aux_loss": "group",
                "routing": {"class_path": "zeda_lightning.routing.ZeroExperts", "init_args": {"seed": 0}},
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003, "weight_decay": 0.0}},
                "lr_schedule": "constant", "warmup_ratio": 0.0,
                **({"export_dir": os.path.join(root, "student"), "export_overwrite": True} if export else {}),
                **(model or {}),
            },
        },
        "data": {
            "class_path": "zeda_lightning.data.module.ZedaDataModule",
            "init_args": {"tokenizer": teacher, "train_files": data["train"], "val_files": data["val"],
                          "max_length": max_length, "batch_size": batch},
        },
    }
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def metrics(root, name: str = "logs") -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(str(root), name, "version_*", "metrics.csv"))):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def series(rows: list[dict], key: str) -> dict[int, float]:
    """``{step: value}`` of a logged key (a resumed run's two logs merged)."""
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) not in (None, "")}
