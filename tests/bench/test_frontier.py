"""bench/frontier.py bookkeeping: knobs aimed at targets, matched-FLOP comparison, outputs."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import frontier  # noqa: E402


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
    assert m["leads"] == {"top_p": True, "static_topk": None}
    assert "leads_kl" not in m  # rows without KL compare NLL only
    kls = (0.06, 0.02, 0.10, 0.03)
    (m,) = frontier.compare_at_matched_flops([{**r, "kl_to_teacher": kl} for r, kl in zip(rows, kls)])
    assert m["others_kl_to_teacher"]["top_p"] == pytest.approx(0.10 - 0.08 * 0.05 / 0.3, abs=1e-4)
    assert m["leads_kl"] == {"top_p": True, "static_topk": None} and m["leads"]["top_p"]


def test_outputs_written_and_read_back(tmp_path):
    rows = [{"method": "zeda", "knob": "w=2", "target": 0.5, "expert_flop_fraction": 0.5, "nll": 2.1,
             "kl_to_teacher": 0.05, "top1_agreement": 0.9, "zero_ratio": 0.5, "teacher_nll": 2.0}]
    summary = frontier.write_outputs(str(tmp_path), rows, {"zeda@w=2": {}}, frontier.QUICK, {"num_experts": 16},
                                     ("zeda",), 1.0, 1)
    assert sorted(os.listdir(tmp_path)) == ["frontier.csv", "frontier.json", "frontier.png", "where.json"]
    assert frontier.read_csv(str(tmp_path / "frontier.csv")) == rows
    assert summary["runs_done"] == 1 and summary["matched_flops"][0]["leads"] == {}


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
