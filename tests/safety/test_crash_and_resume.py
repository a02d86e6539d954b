"""A kill, a full disk or a truncated file loses at most the work since the last checkpoint.

The shipped configs checkpoint periodically; ``configs/tiny.yaml`` (shortened) killed with SIGKILL after its first
checkpoint and resumed with ``--ckpt_path last`` ends with the same losses, validation metrics and export as a run
that was never stopped. Checkpoints are written atomically on their own filesystem, and resume skips a truncated one.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest
import torch
import yaml

from tests.safety.runs import ROOT, error_lines, metrics, run_cli, series, write_config
from zeda_lightning.export import from_pretrained

SHIPPED = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.relpath(p, ROOT) for p in SHIPPED])
def test_every_shipped_config_checkpoints_periodically(path):
    cfg = yaml.safe_load(open(path))
    trainer = cfg["trainer"]
    assert trainer.get("enable_checkpointing", True) is not False
    if "class_path" not in cfg.get("model", {}):  # an override file (configs/slices): it keeps the base's callbacks
        assert "callbacks" not in trainer, "an override that sets callbacks replaces the base config's checkpointing"
        return
    ckpts = [cb["init_args"] for cb in trainer.get("callbacks", []) if cb["class_path"].endswith("ModelCheckpoint")]
    assert ckpts, "no ModelCheckpoint: a killed run would restart from step 0"
    every = ckpts[0].get("every_n_train_steps")
    assert every and ckpts[0].get("save_last"), "Lightning would write the only checkpoint at the end of fit"
    if os.path.basename(path).startswith("tiny"):
        assert every <= 50


def _shortened_tiny(tmp, name, *, kill_at=None):
    """``configs/tiny.yaml`` with its paths under ``tmp/name``, 8 steps of 4 x 64 tokens, a checkpoint every 2."""
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny.yaml")))
    root = str(tmp / name)
    t = cfg["trainer"]
    t.update(max_steps=8, val_check_interval=8, limit_val_batches=2, log_every_n_steps=1, default_root_dir=root,
             enable_progress_bar=False)
    t["logger"]["init_args"].update(save_dir=root)
    t["callbacks"][0]["init_args"].update(dirpath=os.path.join(root, "checkpoints"), every_n_train_steps=2)
    if kill_at is not None:
        t["callbacks"].append({"class_path": "tests.safety.callbacks.KillAtStep", "init_args": {"step": kill_at}})
    cfg["model"]["init_args"]["export_dir"] = os.path.join(root, "student")
    cfg["data"]["init_args"].update(batch_size=4, max_length=64)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), tmp / name


@pytest.fixture(scope="module")
def straight_and_resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    straight, straight_root = _shortened_tiny(tmp, "straight")
    assert run_cli("fit", "--config", straight).returncode == 0
    killed, killed_root = _shortened_tiny(tmp, "killed", kill_at=5)
    proc = run_cli("fit", "--config", killed)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (killed_root / "student").exists()
    resume, _ = _shortened_tiny(tmp, "killed")
    proc = run_cli("fit", "--config", resume, "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return straight_root, killed_root


def test_sigkill_then_resume_gives_the_uninterrupted_run(straight_and_resumed):
    straight_root, killed_root = straight_and_resumed
    a, b = metrics(straight_root, "distill"), metrics(killed_root, "distill")
    for key in ("train/loss", "train/zero_ratio", "val/nll", "val/kl_to_teacher", "val/zero_ratio"):
        sa, sb = series(a, key), series(b, key)
        assert sa and sorted(sa) == sorted(sb), key  # each step logged once across the two logs
        assert sa == sb, key  # bit-identical values
    steps_after_kill = [s for s in series(b, "train/loss") if s >= 4]
    assert steps_after_kill  # the resumed part ran from the step-4 checkpoint
    ids = torch.arange(64).reshape(2, 32)
    with torch.no_grad():
        la = from_pretrained(str(straight_root / "student"))(ids).logits
        lb = from_pretrained(str(killed_root / "student"))(ids).logits
    assert torch.equal(la, lb)


def test_resume_skips_a_truncated_last_checkpoint(tmp_path, tiny_teacher, tiny_data):
    config = write_config(tmp_path / "fit.yaml", tmp_path / "run", tiny_teacher, tiny_data, steps=4, every=2)
    assert run_cli("fit", "--config", config).returncode == 0
    ckpt_dir = tmp_path / "run" / "ckpt"
    good = ckpt_dir / "last.ckpt"
    data = good.read_bytes()
    (ckpt_dir / "last-v1.ckpt").write_bytes(data[: len(data) // 2])  # a full disk while a later run saved
    os.utime(ckpt_dir / "last-v1.ckpt", (os.path.getmtime(good) + 10,) * 2)
    proc = run_cli("fit", "--config", config, "--trainer.max_steps", "6", "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping incomplete checkpoint" in proc.stderr and "last-v1.ckpt" in proc.stderr
    assert min(s for s in series(metrics(tmp_path / "run"), "train/loss") if s >= 4) == 4


def _mount_small_fs(path, size_kb: int) -> bool:
    path.mkdir()
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def test_a_full_disk_leaves_the_previous_checkpoint_whole(tmp_path, tiny_teacher, tiny_data):
    """The checkpoint directory on a filesystem with room for about 1.5 checkpoints: the second save fails with
    ENOSPC; ``last.ckpt`` is still the first, whole, and resume works from it."""
    config = write_config(tmp_path / "fit.yaml", tmp_path / "run", tiny_teacher, tiny_data, steps=2, every=2,
                          export=False)
    assert run_cli("fit", "--config", config).returncode == 0
    size = os.path.getsize(tmp_path / "run" / "ckpt" / "last.ckpt")
    shutil.rmtree(tmp_path / "run")
    small = tmp_path / "small"
    if not _mount_small_fs(small, int(1.5 * size) // 1024):
        pytest.skip("needs a tmpfs mount (root) to fill a real filesystem")
    try:
        cfg = yaml.safe_load(open(config))
        cfg["trainer"]["max_steps"] = 4
        cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(small)
        open(config, "w").write(yaml.safe_dump(cfg))
        proc = run_cli("fit", "--config", config)
        assert proc.returncode != 0 and "No space left on device" in proc.stderr, proc.stderr[-3000:]
        assert os.listdir(small) == ["last.ckpt"], os.listdir(small)  # no temporary file left either
        ckpt = torch.load(small / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 2
        shutil.rmtree(tmp_path / "run")
        roomy = tmp_path / "roomy"  # an atomic save needs room for the new file beside the old one: move them
        roomy.mkdir()
        shutil.copy2(small / "last.ckpt", roomy / "last.ckpt")
        proc = run_cli("fit", "--config", config, "--trainer.max_steps", "3", "--ckpt_path", "last",
                       "--trainer.callbacks.init_args.dirpath", str(roomy))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert sorted(series(metrics(tmp_path / "run"), "train/loss")) == [2]
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_the_temporary_of_a_save_killed_mid_write_is_removed_by_the_next_save(tmp_path, tiny_teacher, tiny_data):
    """A kill inside ``torch.save`` leaves ``.last.ckpt.<random>.tmp`` (as large as a checkpoint) beside
    ``last.ckpt``; the run that takes over the directory removes it at its first save, and nothing else."""
    config = write_config(tmp_path / "fit.yaml", tmp_path / "run", tiny_teacher, tiny_data, steps=2, every=2,
                          export=False)
    ckpt = tmp_path / "run" / "ckpt"
    ckpt.mkdir(parents=True)
    leftover = ckpt / ".last.ckpt.k1ll3d00.tmp"  # mkstemp's name for last.ckpt, as atomic_write makes it
    leftover.write_bytes(b"PK\x03\x04" + b"\0" * 4096)
    mine = ckpt / ".notes.tmp"  # the user's, not a checkpoint temporary
    mine.write_text("keep")
    proc = run_cli("fit", "--config", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not leftover.exists() and mine.read_text() == "keep"
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"] == 2
