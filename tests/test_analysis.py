"""Where-compute-goes bookkeeping: realised slots, histograms, domain x layer shares, token view."""

import pytest
import torch

from zeda_lightning import StaticTopK, ZeroExperts, capture_routing, inject
from zeda_lightning.analysis import (
    expert_flop_fraction,
    real_experts_histogram,
    routing_report,
    skipped_by_group,
    stacked_skips,
    token_view,
)
from zeda_lightning.tiny import tiny_model


def _skips(seed=0, layers=3, tokens=10, k=4, p=0.4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(layers, tokens, k, generator=g) < p


def test_flop_fraction_counts_realised_slots_of_valid_tokens():
    skipped = _skips()
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    kept = sum(int(not skipped[l, t, s]) for l in range(3) for t in range(10) for s in range(4) if mask[t])
    assert expert_flop_fraction(skipped, mask) == pytest.approx(kept / (3 * 8 * 4))
    assert expert_flop_fraction(skipped) == pytest.approx(float((~skipped).float().mean()))
    with pytest.raises(ValueError, match="no valid token"):
        expert_flop_fraction(skipped, torch.zeros(10, dtype=torch.bool))


def test_static_topk_padding_counts_as_skipped():
    model = inject(tiny_model("qwen3_moe"), StaticTopK(k=1))  # K = 2: half the slots are padding sentinels
    with capture_routing(model) as rec:
        model(torch.randint(0, 128, (2, 6)))
    assert expert_flop_fraction(stacked_skips(rec)) == 0.5


def test_histogram_by_hand():
    skipped = _skips(seed=1)
    mask = torch.ones(10, dtype=torch.bool)
    mask[0] = False
    hist = real_experts_histogram(skipped, mask)
    expected = [0] * 5
    for l in range(3):
        for t in range(1, 10):
            expected[4 - int(skipped[l, t].sum())] += 1
    assert hist.tolist() == expected and hist.sum() == 27


def test_skipped_by_group_by_hand():
    skipped = _skips(seed=2, layers=2, tokens=6, k=2)
    groups = torch.tensor([0, 1, 0, -1, 1, 1])  # token 3 belongs to no domain (padding)
    num, den = skipped_by_group(skipped, groups, 2)
    for g in range(2):
        for l in range(2):
            toks = [t for t in range(6) if groups[t] == g]
            assert num[g, l] == sum(int(skipped[l, t].sum()) for t in toks)
            assert den[g, l] == 2 * len(toks)


def test_routing_report_matches_records_and_keeps_mode():
    model = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=0)).train()
    ids = torch.randint(0, 128, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "domain": torch.tensor([0, 1])}
    report = routing_report(model, [batch], ["code", "prose"])
    assert model.training  # restored
    model.eval()
    with torch.no_grad(), capture_routing(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    skipped = stacked_skips(rec)  # (L, 16, K)
    valid = mask.reshape(-1).bool()
    assert report["zero_ratio"] == pytest.approx(float(skipped[:, valid].float().mean()))
    assert report["expert_flop_fraction"] == pytest.approx(1 - report["zero_ratio"])
    seq1 = skipped.view(2, 2, 8, 2)[:, 1, :5]  # (L, 5, K): prose, valid tokens only
    assert report["zero_ratio_domain_layer"]["prose"] == pytest.approx(seq1.float().mean(dim=(1, 2)).tolist())
    assert sum(report["real_experts_histogram"]) == pytest.approx(1.0)


def test_token_view_aligns_with_tokens(tiny_teacher):
    from transformers import AutoTokenizer

    from zeda_lightning.export import from_pretrained

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    model = inject(from_pretrained(tiny_teacher), ZeroExperts(seed=0))
    view = token_view(model, tok, "def f(x):\n    return x")
    assert "".join(piece for piece, _ in view) == "def f(x):\n    return x"
    assert all(0.0 <= real <= 2.0 for _, real in view)
