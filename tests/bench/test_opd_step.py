"""``bench/opd_step.py --quick`` runs end to end (the bench drives the module's own rollout and update code, so a
change there must keep it working) and prints its JSON line."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_opd_step_bench_quick():
    proc = subprocess.run([sys.executable, "bench/opd_step.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sampling_s"] > 0 and out["scoring_s"] > 0 and out["update_s"] > 0
    assert 0 < out["zero_ratio"] < 1
