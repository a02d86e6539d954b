"""A diverging run stops with one line naming the step and the term, before any export or ``last`` checkpoint is
overwritten; metrics propagate NaN instead of dropping it; a non-finite teacher is refused at start."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch

from tests.safety.runs import error_lines, run_cli, write_config
from zeda_lightning.losses import token_kl


def _digest(directory) -> dict[str, str]:
    return {f: hashlib.sha256(open(os.path.join(directory, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(directory))}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, tiny_teacher, tiny_data):
    tmp = tmp_path_factory.mktemp("good")
    config = write_config(tmp / "fit.yaml", tmp / "run", tiny_teacher, tiny_data, steps=4, every=2)
    proc = run_cli("fit", "--config", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, tmp / "run"


def test_a_huge_learning_rate_stops_the_run_before_anything_is_overwritten(good_run, tmp_path):
    config, root = good_run
    export, ckpt = root / "student", root / "ckpt" / "last.ckpt"
    before_export, before_ckpt = _digest(export), hashlib.sha256(ckpt.read_bytes()).hexdigest()
    proc = run_cli("fit", "--config", config, "--model.init_args.optimizer.init_args.lr", "1e9",
                   "--trainer.max_steps", "12", "--trainer.gradient_clip_val", "null")
    assert proc.returncode == 3, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "training diverged at step" in line or "NaN or inf" in line, line
    assert _digest(export) == before_export, "the good export was replaced"
    last = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(bool(torch.isfinite(t).all()) for t in last.values() if torch.is_floating_point(t))


def test_the_error_names_the_term_and_the_layer(tiny_teacher):
    """A NaN in one router's logits: the aux term and that layer are named."""
    from zeda_lightning.modules import ZedaDistillModule
    from zeda_lightning.modules.base import DivergenceError
    from zeda_lightning.routing import RouterOutput

    module = ZedaDistillModule(teacher=tiny_teacher, objective="forward_kl")
    logits = torch.zeros(4, 6)
    good = RouterOutput(logits, torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long), 4, "softmax")
    bad = RouterOutput(torch.full((4, 6), float("nan")), torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.long),
                       torch.zeros(4, 2, dtype=torch.long), 4, "softmax")
    records = {0: good, 1: bad}
    mask = torch.ones(4, dtype=torch.bool)
    aux = module.aux_loss(records, mask)
    with pytest.raises(DivergenceError) as err:
        module.check_finite({"distillation": torch.tensor(0.5), "aux": aux},
                            detail=lambda name: module.nonfinite_layers(records, mask) if name == "aux" else None)
    message = str(err.value)
    assert "step 0" in message and "aux loss = nan" in message and "router layers [1]" in message
    assert "distillation" not in message


def test_kl_and_metrics_propagate_nan(tiny_teacher):
    log_p = torch.log_softmax(torch.tensor([[0.0, 1.0, float("nan")]]), -1)
    assert torch.isnan(token_kl(log_p, torch.log_softmax(torch.zeros(1, 3), -1))).all()  # was 0.0
    from zeda_lightning.modules import ZedaDistillModule

    module = ZedaDistillModule(teacher=tiny_teacher)
    module.configure_model()
    metric = module.eval_metrics["kl_to_teacher"]
    metric.update(torch.tensor(float("nan")), 3)
    metric.update(torch.tensor(0.5), 3)
    assert torch.isnan(metric.compute())  # torchmetrics' default drops NaN with a warning


def test_a_teacher_with_an_inf_weight_is_refused_at_start(tmp_path, tiny_teacher, tiny_data):
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    state = load_file(teacher / "model.safetensors")
    key = next(k for k in state if k.endswith("mlp.gate.weight"))
    state[key][0, 0] = float("inf")
    save_file(state, teacher / "model.safetensors", metadata={"format": "pt"})
    config = write_config(tmp_path / "fit.yaml", tmp_path / "run", str(teacher), tiny_data)
    proc = run_cli("fit", "--config", config)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert f"teacher {teacher}" in line and key.split(".mlp")[0] in line and "NaN or inf" in line
    assert not (tmp_path / "run" / "ckpt").exists() and not (tmp_path / "run" / "student").exists()
