"""The command line reports bad input in one line (exit 2) instead of a traceback, and unwraps jsonargparse."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "zeda_lightning", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_bad_input_is_one_line_naming_the_fix_and_exit_2(tmp_path):
    out = tmp_path / "budget"
    proc = _run("budget", "--model", "assets/tiny_teacher", "--target", "1.2", "--calibration",
                "data/tiny_corpus/val.jsonl.gz", "--heldout", "data/tiny_corpus/test.jsonl.gz", "--out", str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "zeda_lightning: error: budget target (zero-slot ratio) must be in [0, 1), got 1.2" in proc.stderr
    assert "Traceback" not in proc.stderr and "budget.py:" in proc.stderr
    assert not out.exists()
    proc = _run("budget", "--model", "assets/tiny_teacher", "--target", "1.2", "--calibration", "x", "--heldout", "y",
                "--out", str(out), env={"ZEDA_TRACEBACK": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError: budget target" in proc.stderr


def test_fit_reports_the_check_that_jsonargparse_wraps(tmp_path):
    root = tmp_path / "run"
    proc = _run("fit", "--config", "configs/tiny.yaml", "--model.init_args.teacher", str(tmp_path / "missing"),
                "--trainer.default_root_dir", str(root))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("zeda_lightning: error:")]
    assert lines == [f"zeda_lightning: error: model directory not found: {tmp_path / 'missing'}"]
    assert "Union subtypes" not in proc.stderr and not root.exists()
