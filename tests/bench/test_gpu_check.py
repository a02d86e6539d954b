"""bench/gpu_check.py on CPU (``--device cpu --quick``): every section runs and reports sane figures, so the GPU
check cannot rot before a GPU runs it."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device", "cpu", "--quick",
                           "--work", str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout[-2000:]
    return json.loads(lines[-1]), work


def test_every_section_ran(result):
    out, _ = result
    assert out["errors"] == {}
    assert {"moe_block", "tiny_fit", "generate", "slice_fit"} <= set(out)
    assert out["device"] == "cpu" and out["quick"] is True
    assert all(_positive(s) for s in out["seconds"].values())


def test_moe_block_both_real_configs(result):
    out, _ = result
    assert set(out["moe_block"]) == {"qwen3_30b_a3b", "glm_4_7_flash"}
    for shape in out["moe_block"].values():
        (ratio,) = shape["ratio_at_0.5"].values()
        assert _positive(ratio) and ratio < 5  # a ratio, not a time
        (share,) = shape["realised_zero_ratio"].values()
        assert abs(share - 0.5) <= 0.05  # the calibration reached the share it times
        assert all(_positive(v) for v in (*shape["original_ms"].values(), *shape["ms_at_0.5"].values()))


def test_tiny_fit_and_generation(result):
    out, work = result
    fit = out["tiny_fit"]
    assert fit["steps"] == 6 and _positive(fit["steps_per_s"])
    for key in ("val/nll", "val/teacher_nll", "val/kl_to_teacher", "val/zero_ratio", "train/loss"):
        assert math.isfinite(fit["metrics"][key]), key
    assert _positive(fit["metrics"]["val/nll"]) and 0 <= fit["metrics"]["val/zero_ratio"] <= 1
    assert os.path.isfile(os.path.join(fit["export_dir"], "config.json"))  # the student generation then loads
    gen = out["generate"]
    for key in ("prefill_tok_s", "decode_tok_s"):
        assert _positive(gen[key]["teacher"]) and _positive(gen[key]["student"])
    assert _positive(gen["prefill_speedup"]) and _positive(gen["decode_speedup"])
    assert 0 < gen["student_zero_share_prefill"] < 1  # the trained student routes some slots to zero experts


def test_slice_fit_model_parallel_on_cpu(result):
    out, _ = result
    fit = out["slice_fit"]
    assert "FSDPStrategy" not in fit  # Lightning's FSDPStrategy refuses CPU; CUDA runs both
    run = fit["ModelParallelStrategy"]
    assert run["steps"] == 3 and _positive(run["steps_per_s"])
    assert _positive(run["metrics"]["train/loss"]) and _positive(run["metrics"]["val/nll"])
    with open(os.path.join(fit["slice_dir"], "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_hidden_layers"] == 2  # a real-config slice, 2 MoE layers
