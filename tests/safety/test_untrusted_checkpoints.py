"""A checkpoint restores state and never configures or runs anything: every load is ``weights_only=True``, the
distributed metadata is read with a restricted unpickler, hyperparameters in a checkpoint never become classes or
calls, the user's YAML and flags win, and a checkpoint of another routing config or shape is refused up front."""

from __future__ import annotations

import glob
import os
import pickle
import shutil

import pytest
import torch
import yaml

from tests.safety.runs import error_lines, metrics, run_cli, write_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_teacher, tiny_data):
    """A finished 4-step run with a single-file ``last.ckpt`` and an export."""
    tmp = tmp_path_factory.mktemp("trained")
    config = write_config(tmp / "fit.yaml", tmp / "run", tiny_teacher, tiny_data)
    proc = run_cli("fit", "--config", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"config": config, "root": tmp / "run", "ckpt": str(tmp / "run" / "ckpt" / "last.ckpt")}


class _Exec:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def _touch(marker) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')"


def _dcp_dir(path, hparams, meta_pt=None, metadata=None):
    """A distributed-checkpoint directory (one real shard) with a hostile ``meta.pt`` or ``.metadata``; the other
    file looks like a real run's (its hyperparameters), so every check before the load passes."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": {"x": torch.zeros(2)}}, checkpoint_id=str(path), no_dist=True)
    torch.save(meta_pt if meta_pt is not None else {"hyper_parameters": hparams, "global_step": 4}, str(path / "meta.pt"))
    if metadata is not None:
        (path / ".metadata").write_bytes(metadata if isinstance(metadata, bytes) else pickle.dumps(metadata))
    return str(path)


def _dotted_global(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle calling ``module``'s ``name`` on ``arg``: pickle resolves a dotted ``name`` attribute by
    attribute, so an allowed module's own imports (``os.system`` in DCP's filesystem module) are reachable."""
    def text(value: str) -> bytes:
        raw = value.encode()
        return b"\x8c" + bytes([len(raw)]) + raw

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."


@pytest.mark.parametrize("where", ["meta.pt", ".metadata", ".metadata via an allowed module's import"])
def test_a_hostile_distributed_checkpoint_is_never_unpickled(tmp_path, trained, where):
    marker = tmp_path / "MARKER"
    evil = _Exec(_touch(marker))
    if where.startswith(".metadata via"):
        evil = _dotted_global("torch.distributed.checkpoint.filesystem", "os.system", f"touch {marker}")
    hparams = torch.load(trained["ckpt"], weights_only=True)["hyper_parameters"]
    ckpt = _dcp_dir(tmp_path / "evil.ckpt", hparams, meta_pt=evil if where == "meta.pt" else None,
                    metadata=evil if where.startswith(".metadata") else None)
    for args in (["consolidate", "--ckpt", ckpt, "--out", str(tmp_path / "out")],
                 ["fit", "--config", trained["config"], "--trainer.default_root_dir", str(tmp_path / "r"),
                  "--ckpt_path", ckpt]):
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert error_lines(proc), proc.stderr[-3000:]
        assert not marker.exists(), f"{args[0]} ran code from {where}"
    assert not (tmp_path / "out").exists()


def test_checkpoint_hyperparameters_never_become_calls(tmp_path, trained):
    """``hyper_parameters.optimizer: {class_path: os.system, ...}`` passes weights_only; it must not be called."""
    marker = tmp_path / "MARKER"
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    ckpt["hyper_parameters"]["optimizer"] = {"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    root = tmp_path / "resumed"
    proc = run_cli("fit", "--config", trained["config"], "--trainer.max_steps", "6", "--ckpt_path", str(evil),
                   *_paths(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()


def _paths(root):
    return ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.callbacks.init_args.dirpath", str(root / "ckpt"), "--model.init_args.export_dir",
            str(root / "student")]


def test_the_users_flags_win_over_the_checkpoints(tmp_path, trained):
    root = tmp_path / "resumed"
    proc = run_cli("fit", "--config", trained["config"], "--trainer.max_steps", "6", "--ckpt_path", trained["ckpt"],
                   "--model.init_args.group_w", "3.0", *_paths(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (hparams,) = glob.glob(str(root / "logs" / "version_*" / "hparams.yaml"))
    assert yaml.safe_load(open(hparams))["group_w"] == 3.0
    steps = [int(r["step"]) for r in metrics(root) if r.get("train/loss")]
    assert steps and min(steps) >= 4  # resumed after the checkpoint's 4 steps, not from 0
    # export_overwrite: false on the command line holds although the checkpoint says true
    proc = run_cli("fit", "--config", trained["config"], "--trainer.max_steps", "6", "--ckpt_path", trained["ckpt"],
                   "--model.init_args.export_overwrite", "false", *_paths(root))
    assert proc.returncode == 2 and any("exists and is not empty" in line for line in error_lines(proc)), proc.stderr[-3000:]


def test_a_checkpoint_of_another_routing_config_is_refused_naming_both(tmp_path, trained):
    root = tmp_path / "other"
    proc = run_cli("fit", "--config", trained["config"], "--ckpt_path", trained["ckpt"],
                   "--model.init_args.routing.init_args.num_zero_experts", "4", *_paths(root))
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert f"checkpoint {trained['ckpt']} was trained with routing" in line
    assert "'num_zero_experts': None" in line and "'num_zero_experts': 4" in line
    assert not root.exists()


def test_a_checkpoint_of_another_shape_is_refused_naming_both(tmp_path, trained):
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    key = "student.model.embed_tokens.weight"
    ckpt["state_dict"][key] = ckpt["state_dict"][key][:-1].clone()
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    root = tmp_path / "other"
    proc = run_cli("fit", "--config", trained["config"], "--ckpt_path", str(other), *_paths(root))
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "does not fit the configured student" in line and key in line
    assert not root.exists()


def test_a_checkpoint_that_is_not_plain_data_is_refused(tmp_path, trained):
    marker = tmp_path / "MARKER"
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    ckpt["hyper_parameters"]["routing"] = _Exec(_touch(marker))
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    proc = run_cli("fit", "--config", trained["config"], "--ckpt_path", str(evil), *_paths(tmp_path / "r"))
    assert proc.returncode == 2 and any("weights_only=True" in line for line in error_lines(proc)), proc.stderr[-3000:]
    assert not marker.exists() and not (tmp_path / "r").exists()

