"""Compute-budget knob: calibrated zero-logit biases hit a target zero ratio on held-out text, save real expert
compute, survive export, and refuse bad input before anything is written."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from zeda_lightning import ZeroExperts, inject
from zeda_lightning.budget import (
    BUDGET_KEY,
    calibrate_zero_bias,
    measure_zero_ratio,
    text_blocks,
    zero_logit_biases,
)
from zeda_lightning.cli import main as cli_entry
from zeda_lightning.export import from_pretrained
from zeda_lightning.routing.zero_experts import ZeroExpertRouter
from tests.helpers import export_zero_expert_student
from tests.helpers import single_thread  # noqa: F401  (autouse: one intra-op thread)


@pytest.fixture(scope="module")
def zeda_student(tmp_path_factory, tiny_teacher):
    """The tiny teacher with zero experts (random new rows): a zeda export with its tokenizer."""
    return export_zero_expert_student(tiny_teacher, str(tmp_path_factory.mktemp("budget") / "student"))


@pytest.fixture(scope="module")
def blocks(tiny_teacher, tiny_data):
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    return text_blocks(tiny_data["train"], tok, block_size=32, max_blocks=24), text_blocks(tiny_data["val"], tok, 32)


def _kept_rows(model, ids):
    """(token, expert) pairs the experts modules really receive (after the sentinel pre-hook drops skipped slots)."""
    rows, handles = [], []
    for m in model.modules():
        skip = getattr(m, "_zeda_skip", None)
        if skip is not None:  # runs after SentinelSkip.pre: sees the reduced (S', H) hidden states
            handles.append(m.register_forward_pre_hook(lambda mod, args, kw: rows.append(
                (list(args) + list(kw.values()))[1].numel()), with_kwargs=True))  # (token, slot) pairs
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return rows


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_per_layer_budget_hits_target_on_held_out_text_and_skips_real_rows(zeda_student, blocks, target):
    calib, held = blocks
    model = from_pretrained(zeda_student)
    record = calibrate_zero_bias(model, calib, target)
    # every layer is at the target on the calibration sample (resolution: one slot in T*K)
    per_layer = measure_zero_ratio(model, calib)["per_layer"]
    assert all(abs(r - target) <= 0.01 for r in per_layer.values()), per_layer
    held_ratio = measure_zero_ratio(model, held)["zero_ratio"]
    assert abs(held_ratio - target) <= 0.02, (target, held_ratio)
    # the skipped share is compute not done: the experts see exactly the kept (token, slot) rows
    k = model.config.num_experts_per_tok
    rows = _kept_rows(model, held)
    assert sum(rows) / (len(rows) * held.numel() * k) == pytest.approx(1 - held_ratio, abs=1e-6)
    assert record["target"] == target and len(record["zero_logit_bias"]) == len(rows)
    assert getattr(model.config, BUDGET_KEY)["zero_logit_bias"] == zero_logit_biases(model)


def test_biases_order_the_ratio_and_global_mode_shares_one_bias(zeda_student, blocks):
    calib, held = blocks
    model = from_pretrained(zeda_student)
    low = calibrate_zero_bias(model, calib, 0.3)["zero_logit_bias"]
    high = calibrate_zero_bias(model, calib, 0.7)["zero_logit_bias"]
    assert all(a < b for a, b in zip(low, high))  # more skipping needs a larger bias in every layer
    record = calibrate_zero_bias(model, calib[::2], 0.5, mode="global", iters=14)  # a forward per step: keep it small
    assert len(set(record["zero_logit_bias"])) == 1
    assert abs(record["calibration_zero_ratio"] - 0.5) <= 0.01
    assert abs(measure_zero_ratio(model, held)["zero_ratio"] - 0.5) <= 0.02
    zero = calibrate_zero_bias(model, calib, 0.0)
    assert measure_zero_ratio(model, held)["zero_ratio"] <= 0.02 and zero["calibration_zero_ratio"] == 0.0


def test_budget_cli_exports_a_model_that_reloads_with_its_budget(tmp_path, zeda_student, tiny_data, capsys):
    out = tmp_path / "budget60"
    cli_entry(["budget", "--model", zeda_student, "--target", "0.6", "--calibration", tiny_data["train"],
               "--heldout", tiny_data["val"], "--block_size", "32", "--calibration_blocks", "24", "--out", str(out)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(summary["heldout_zero_ratio"] - 0.6) <= 0.02
    cfg = json.loads((out / "config.json").read_text())
    assert cfg[BUDGET_KEY]["target"] == 0.6 and cfg[BUDGET_KEY]["zero_logit_bias"] == summary["zero_logit_bias"]
    reloaded = from_pretrained(str(out))
    assert zero_logit_biases(reloaded) == summary["zero_logit_bias"]
    held = text_blocks(tiny_data["val"], AutoTokenizer.from_pretrained(str(out)), 32, 32)  # the CLI's held-out blocks
    assert measure_zero_ratio(reloaded, held)["zero_ratio"] == pytest.approx(summary["heldout_zero_ratio"], abs=1e-6)
    # the weights are the student's: with the biases back at 0 the logits equal the original export's
    for r in reloaded.modules():
        if isinstance(r, ZeroExpertRouter):
            r.zero_logit_bias = 0.0
    with torch.no_grad():
        assert torch.equal(reloaded(held[:2]).logits, from_pretrained(zeda_student)(held[:2]).logits)


def test_budget_bad_input_writes_nothing(tmp_path, zeda_student, tiny_teacher, tiny_data, blocks):
    out = tmp_path / "out"
    base = ["budget", "--model", zeda_student, "--calibration", tiny_data["train"], "--out", str(out),
            "--block_size", "32"]
    for bad in ("1.0", "-0.1", "1.5"):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
            cli_entry(base + ["--target", bad])
    with pytest.raises(ValueError, match="no 'zeda_routing' field"):
        cli_entry(["budget", "--model", tiny_teacher, "--target", "0.5", "--calibration", tiny_data["train"],
                   "--out", str(out)])
    with pytest.raises(ValueError, match="fewer than one block"):
        cli_entry(base[:-2] + ["--block_size", "100000", "--target", "0.5"])
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty; pass overwrite"):
        cli_entry(base + ["--target", "0.5"])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # in Python: a plain model, masked zero experts, an unreachable target
    calib, _ = blocks
    with pytest.raises(ValueError, match="no zero-expert routers"):
        calibrate_zero_bias(from_pretrained(tiny_teacher), calib, 0.5)
    masked = inject(from_pretrained(tiny_teacher), ZeroExperts(mask_zero=True, seed=0))
    with pytest.raises(ValueError, match="masked"):
        calibrate_zero_bias(masked, calib, 0.5)
    one_zero = inject(from_pretrained(tiny_teacher), ZeroExperts(num_zero_experts=1, seed=0))  # N_Z=1 < K=2
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_zero_bias(one_zero, calib, 0.6)
    assert zero_logit_biases(one_zero) == [0.0] * len(zero_logit_biases(one_zero))


def test_a_routing_without_the_budget_capability_is_refused():
    """LongCat's controller and MoE++ select without the zero-logit bias: calibrating them would bisect a knob that
    does nothing, so the budget refuses them by the capability they (do not) declare."""
    from zeda_lightning.adapters import inject
    from zeda_lightning.budget import zero_routers
    from zeda_lightning.routing import LongCatBias, MoEPlusPlus
    from zeda_lightning.tiny import tiny_model

    for variant in (LongCatBias(seed=0), MoEPlusPlus(seed=0)):
        with pytest.raises(ValueError, match="do not take the zero-logit budget"):
            zero_routers(inject(tiny_model("qwen3_moe"), variant))
