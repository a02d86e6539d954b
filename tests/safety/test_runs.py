"""Whole runs that would silently do harm: nothing to train, an export target that holds the run or the teacher,
a zeda export as teacher, two runs on one output directory, bad trainer settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import export_zero_expert_student
from tests.safety.runs import ROOT, error_lines, run_cli, write_config


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_a_fit_that_trains_nothing_is_refused_before_anything_is_written(tmp_path, tiny_teacher, tiny_data, steps):
    export = tmp_path / "run" / "student"
    config = write_config(tmp_path / "fit.yaml", tmp_path / "run", tiny_teacher, tiny_data)
    proc = run_cli("fit", "--config", config, "--trainer.max_steps", steps)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "max_steps" in line and steps in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists() and not export.exists()


@pytest.mark.parametrize("target", ["root", "teacher", "cwd"])
def test_export_dir_never_names_the_run_the_teacher_or_the_working_directory(tmp_path, tiny_teacher, tiny_data, target):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    root = tmp_path / "run"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    export = {"root": root, "teacher": teacher, "cwd": tmp_path}[target]
    config = write_config(tmp_path / "fit.yaml", root, str(teacher), tiny_data,
                          model={"export_dir": str(export), "export_overwrite": True})
    before = sorted(os.listdir(export))
    proc = run_cli("fit", "--config", config, cwd=str(tmp_path) if target == "cwd" else ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_lines(proc), proc.stderr[-3000:]
    assert sorted(os.listdir(export)) == before and (root / "notes.txt").read_text() == "mine"
    assert not (root / "ckpt").exists()


def test_a_zeda_export_as_teacher_is_refused_unless_allowed(tmp_path, tiny_teacher, tiny_data):
    student = export_zero_expert_student(tiny_teacher, str(tmp_path / "student"))
    config = write_config(tmp_path / "fit.yaml", tmp_path / "run", student, tiny_data, steps=1, every=1)
    proc = run_cli("fit", "--config", config)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert f"teacher {student} is a zeda export" in line and "allow_zeda_teacher" in line
    assert not (tmp_path / "run").exists()


def test_a_second_run_on_the_same_outputs_refuses_naming_the_first(tmp_path, tiny_teacher, tiny_data):
    release, started = tmp_path / "release", tmp_path / "started"
    hold = {"class_path": "tests.safety.callbacks.WaitForFile", "init_args": {"path": str(release), "started": str(started)}}
    first_cfg = write_config(tmp_path / "first.yaml", tmp_path / "run", tiny_teacher, tiny_data, steps=2, callbacks=[hold])
    second_cfg = write_config(tmp_path / "second.yaml", tmp_path / "run", tiny_teacher, tiny_data, steps=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    first = subprocess.Popen([sys.executable, "-m", "zeda_lightning", "fit", "--config", first_cfg], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not started.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert started.exists(), first.stderr.read()[-3000:] if first.poll() is not None else "first run did not start"
        proc = run_cli("fit", "--config", second_cfg)
        assert proc.returncode == 2, proc.stderr[-3000:]
        (line,) = error_lines(proc)
        assert "is in use by another run" in line and f"pid {first.pid}" in line
    finally:
        release.write_text("go")
        first.wait(timeout=300)
    assert first.returncode == 0
    # the first run is over: its lock is gone and a new run may start
    assert run_cli("fit", "--config", second_cfg).returncode == 0


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path, tiny_teacher, tiny_data):
    import socket

    from zeda_lightning.runlock import lock_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    config = write_config(tmp_path / "fit.yaml", tmp_path / "run", tiny_teacher, tiny_data, steps=1, every=1)
    lock = lock_path(str(tmp_path / "run" / "ckpt"))
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with open(lock, "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": "x", "command": "killed"}, f)
    proc = run_cli("fit", "--config", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not os.path.exists(lock)


def test_an_empty_lock_of_a_run_killed_while_starting_is_taken_over(tmp_path, tiny_teacher, tiny_data):
    """Killed between creating its lock and writing its owner, a run leaves an empty lock: once older than the
    grace period it is stale (it used to be refused forever, naming 'pid None')."""
    from zeda_lightning.runlock import UNREADABLE_GRACE_S, lock_path

    config = write_config(tmp_path / "fit.yaml", tmp_path / "run", tiny_teacher, tiny_data, steps=1, every=1)
    lock = lock_path(str(tmp_path / "run" / "ckpt"))
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    open(lock, "w").close()
    old = os.path.getmtime(lock) - 2 * UNREADABLE_GRACE_S
    os.utime(lock, (old, old))
    proc = run_cli("fit", "--config", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not os.path.exists(lock)


def test_a_lock_whose_pid_now_names_another_process_is_stale(tmp_path):
    """After a reboot or pid wrap-around a dead run's pid can name a live process: the recorded start time tells."""
    import socket

    from zeda_lightning.fsio import process_start
    from zeda_lightning.runlock import RunLock, lock_path

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = str(tmp_path / "out")
        lock = lock_path(out)
        owner = {"pid": other.pid, "host": socket.gethostname(), "started": "x", "command": "old run"}
        with open(lock, "w") as f:  # the live process is the owner it names: refused
            json.dump({**owner, "proc_start": process_start(other.pid)}, f)
        with pytest.raises(ValueError, match=f"pid {other.pid}"):
            RunLock().acquire([out])
        with open(lock, "w") as f:  # the same pid, started at another time: another process, so the lock is stale
            json.dump({**owner, "proc_start": "1"}, f)
        held = RunLock().acquire([out])
        assert json.load(open(lock))["pid"] == os.getpid()
        held.release()
        assert not os.path.exists(lock)
    finally:
        other.kill()
        other.wait()
