"""bench/frontier.py bookkeeping: knobs aimed at targets, matched-FLOP comparison, outputs."""

import os
import sys

import pytest
import torch

from tests.helpers import single_thread  # noqa: F401
from zeda_lightning.adapters import inject, set_zero_mask
from zeda_lightning.analysis import zero_ratio
from zeda_lightning.losses.router_losses import BeamSparsity
from zeda_lightning.routing import AdaptiveK, Beam, ZeroExperts, capture_routing
from zeda_lightning.routing.adaptive_k import even_thresholds
from zeda_lightning.tiny import tiny_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import frontier  # noqa: E402
import where  # noqa: E402


def test_group_w_hits_the_l_ga_equilibrium_share():
    for r in (0.25, 0.375, 0.5, 0.625):
        w = frontier.group_w(r, 16, 8)
        assert w * 8 / (w * 8 + 16) == pytest.approx(r)  # zeda.md: share = w N_Z / (w N_Z + N)
    assert frontier.group_w(0.5, 16, 8) == pytest.approx(2.0)  # the paper's setting


def test_static_ks_bracket_each_target():
    assert frontier.static_ks((0.25, 0.375, 0.5, 0.625), 4) == [3, 2, 1]
    assert frontier.static_ks((0.5,), 4) == [2]


def test_interpolate_and_out_of_range():
    pts = [(0.5, 2.2), (0.75, 2.1)]
    assert frontier.interpolate(pts, 0.6) == pytest.approx(2.2 - 0.1 * 0.1 / 0.25)
    assert frontier.interpolate(pts, 0.4) is None and frontier.interpolate(pts, 0.8) is None


def test_compare_at_matched_flops_uses_realised_fractions():
    rows = [
        {"method": "zeda", "target": 0.5, "expert_flop_fraction": 0.55, "nll": 2.15},
        {"method": "top_p", "target": 0.25, "expert_flop_fraction": 0.8, "nll": 2.10},
        {"method": "top_p", "target": 0.5, "expert_flop_fraction": 0.5, "nll": 2.30},  # nominal match, realised not
        {"method": "static_topk", "target": 0.25, "expert_flop_fraction": 0.75, "nll": 2.12},
    ]
    (m,) = frontier.compare_at_matched_flops(rows)
    assert m["others_nll"]["top_p"] == pytest.approx(2.30 - 0.2 * 0.05 / 0.3, abs=1e-4)
    assert m["leads_nll"] == {"top_p": True, "static_topk": None}
    assert "leads_kl" not in m  # rows without KL compare NLL only
    kls = (0.06, 0.02, 0.10, 0.03)
    (m,) = frontier.compare_at_matched_flops([{**r, "kl_to_teacher": kl} for r, kl in zip(rows, kls)])
    assert m["others_kl_to_teacher"]["top_p"] == pytest.approx(0.10 - 0.08 * 0.05 / 0.3, abs=1e-4)
    assert m["leads_kl"] == {"top_p": True, "static_topk": None} and m["leads_nll"]["top_p"]


def test_outputs_written_and_read_back(tmp_path):
    rows = [{"method": "zeda", "knob": "w=2", "target": 0.5, "expert_flop_fraction": 0.5, "nll": 2.1,
             "kl_to_teacher": 0.05, "top1_agreement": 0.9, "zero_ratio": 0.5, "teacher_nll": 2.0}]
    summary = frontier.write_outputs(str(tmp_path), rows, {"zeda@w=2": {}}, frontier.QUICK, {"num_experts": 16},
                                     ("zeda",), 1.0, 1)
    assert sorted(os.listdir(tmp_path)) == ["frontier.csv", "frontier.json", "frontier.png", "where.json"]
    assert frontier.read_csv(str(tmp_path / "frontier.csv")) == rows
    assert summary["runs_done"] == 1 and summary["matched_flops"][0]["leads_nll"] == {}


def test_bad_arguments_fail_before_any_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown methods"):
        frontier.run(frontier.QUICK, methods=("zeda", "moe"), out=str(out))
    with pytest.raises(ValueError, match="ratios must lie in"):
        frontier.run(frontier.QUICK, ratios=(0.5, 1.0), out=str(out))
    assert not out.exists()


def test_interleave_domains_keeps_every_block_and_balances_prefixes():
    blocks = [{"domain": d, "i": i} for d, n in ((0, 5), (1, 2), (2, 3)) for i in range(n)]
    mixed = frontier.interleave_domains(blocks)
    assert sorted((b["domain"], b["i"]) for b in mixed) == sorted((b["domain"], b["i"]) for b in blocks)
    assert [b["domain"] for b in mixed[:3]] == [0, 1, 2]


def _batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 128, (4, 24), generator=g) for _ in range(2)]
    masks = [torch.ones(4, 24, dtype=torch.long), torch.ones(4, 24, dtype=torch.long)]
    masks[1][:, 18:] = 0  # padding is left out of the share
    return [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, masks)]


@pytest.mark.parametrize("target", [0.25, 0.5, 0.625])
def test_adaptive_k_calibration_hits_the_target_share(target):
    """The thresholds returned, injected afresh, skip the target share of slots on the same batches."""
    torch.manual_seed(0)
    thresholds = frontier.calibrate_adaptive_k(tiny_model("qwen3_moe", num_experts_per_tok=4), _batches(), target,
                                               iters=14)
    scale = thresholds[-1] * 4 / 3
    assert thresholds == pytest.approx(even_thresholds(scale, 4), abs=1e-4)  # evenly spaced fractions of ln N
    model = inject(tiny_model("qwen3_moe", num_experts_per_tok=4), AdaptiveK(thresholds=thresholds))
    num = den = 0.0
    with torch.no_grad():
        for b in _batches():
            with capture_routing(model) as rec:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            n = int(b["attention_mask"].sum())
            num, den = num + zero_ratio(rec, b["attention_mask"]).item() * n, den + n
    assert abs(num / den - target) <= 0.02, (num / den, thresholds)


def test_beam_plans_carry_their_sparsity_target():
    plans = frontier.make_plans(("beam",), (0.25, 0.5), frontier.QUICK, {"num_experts": 16, "top_k": 4}, [])
    assert [p.target for p in plans] == [0.5, 0.25]  # nearest half the FLOPs first
    for p in plans:
        loss = p.module_kwargs["aux_loss"]
        assert isinstance(p.routing, Beam) and isinstance(loss, BeamSparsity)
        assert loss.target == p.target and loss.coef == frontier.QUICK.beam_coef


def test_ranks_and_correlations_by_hand():
    assert where.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 4.0, 9.0, 16.0])
    assert where.pearson(x, 2 * x + 1) == pytest.approx(1.0) and where.spearman(x, y) == pytest.approx(1.0)
    # r = cov / (sd sd) written out for a small non-linear case
    dx, dy = x - x.mean(), y - y.mean()
    assert where.pearson(x, y) == pytest.approx(float((dx * dy).sum() / (dx.norm() * dy.norm())))
    assert where.pearson(x, torch.ones(4)) is None  # constant: undefined


def test_token_signals_against_the_teacher_itself_and_a_shifted_kl():
    torch.manual_seed(0)
    teacher = tiny_model("qwen3_moe").eval()
    student = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=0)).eval()
    with torch.no_grad():
        student.lm_head.weight.mul_(50.0)  # peaked next-token distributions: a KL well above rounding
        for layer in student.model.layers:
            layer.mlp.gate.zero_logit_bias = 1.0  # and many skipped slots
    teacher.lm_head.weight.data = student.lm_head.weight.data.clone()
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "domain": torch.tensor([0, 1])}
    sig = where.token_signals(student, teacher, batch)
    assert sig["zero"].shape == (2, 16) and sig["domain"].tolist() == [0] * 9 + [1] * 7
    with torch.no_grad():
        log_t = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits, -1)
        log_s = torch.log_softmax(student(input_ids=ids, attention_mask=mask).logits, -1)
    valid = mask.reshape(-1).bool()
    ent = -(log_t.exp() * log_t).sum(-1).reshape(-1)[valid]
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    assert torch.allclose(sig["teacher_entropy"], ent, atol=1e-5)
    assert torch.allclose(sig["kl"], kl.reshape(-1)[valid], rtol=1e-4, atol=1e-7) and sig["kl"].mean() > 1e-4
    prev = sig["kl_prev"].reshape(-1)
    assert torch.isnan(prev[0]) and torch.isnan(prev[9])  # each sequence's first position has no step before
    assert torch.allclose(prev[1:9], kl[0, :8], rtol=1e-4) and torch.allclose(prev[10:16], kl[1, :6], rtol=1e-4)
    set_zero_mask(student, True)  # the masked student is the teacher: nothing skipped, KL exactly 0
    sig = where.token_signals(student, teacher, batch)
    assert (sig["zero"] == 0).all() and torch.equal(sig["kl"], torch.zeros(16))


def test_uncertainty_report_per_domain_and_layer():
    torch.manual_seed(0)
    teacher = tiny_model("qwen3_moe").eval()
    student = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=0)).eval()
    batches = [{"input_ids": torch.randint(0, 128, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long),
                "domain": torch.tensor([0, 1])} for _ in range(2)]
    rep = where.uncertainty_report(student, teacher, batches, ["code", "prose"])
    assert rep["layers"] == [0, 1] and sorted(rep["domains"]) == ["code", "prose"]
    assert rep["all"]["tokens"] == 48 and rep["domains"]["code"]["tokens"] == 24
    sig = [where.token_signals(student, teacher, b) for b in batches]
    z = torch.cat([s["zero"] for s in sig], -1)
    h = torch.cat([s["teacher_entropy"] for s in sig])
    assert rep["all"]["teacher_entropy"]["1"]["pearson"] == pytest.approx(where.pearson(z[1], h), abs=1e-4)
    assert rep["all"]["zero_ratio"] == pytest.approx(float(z.mean()), abs=1e-4)
    assert len(rep["all"]["zero_by_entropy_quintile"]) == 5
