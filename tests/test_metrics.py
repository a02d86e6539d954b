"""The distillation metrics by hand: every held-out mean is weighted by the tokens it scored (a short last batch
counts for its tokens, not as a whole batch), NaN propagates, and the zero-slot shares are slot-weighted."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zeda_lightning.metrics import DistillMetrics, WeightedMean


def _batch(seq, vocab, valid, seed):
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(len(valid), seq, vocab, generator=g), torch.randn(len(valid), seq, vocab, generator=g)
    labels = torch.randint(0, vocab, (len(valid), seq), generator=g)
    for row, n in enumerate(valid):
        labels[row, n:] = -100
    return student, teacher, labels


def test_means_are_weighted_by_scored_tokens():
    metrics = DistillMetrics(layer_ids=[0, 1], domains=[], top_k=2)
    batches = [_batch(16, 11, [16, 16, 16, 16], 0), _batch(16, 11, [3], 1)]  # 60 scored tokens, then 2
    nll, kl, agree, tokens = 0.0, 0.0, 0.0, 0
    for student, teacher, labels in batches:
        s, t, y = student[:, :-1], teacher[:, :-1], labels[:, 1:]
        mask = y != -100
        nll += F.cross_entropy(s.reshape(-1, 11), y.reshape(-1), ignore_index=-100, reduction="sum").item()
        ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        kl += (lt.exp() * (lt - ls)).sum(-1)[mask].sum().item()
        agree += (s.argmax(-1) == t.argmax(-1))[mask].sum().item()
        tokens += int(mask.sum())
        metrics.update(student, teacher, labels, torch.tensor([[3.0, 5.0]]), torch.tensor([[8.0, 8.0]]))
    out = metrics.results()
    assert tokens == 62
    assert abs(float(out["nll"]) - nll / tokens) < 1e-5
    assert abs(float(out["kl_to_teacher"]) - kl / tokens) < 1e-5
    assert abs(float(out["top1_agreement"]) - agree / tokens) < 1e-6
    assert abs(float(out["zero_ratio"]) - 16 / 32) < 1e-6  # (3 + 5) x 2 skipped of 32 slots
    assert abs(float(out["zero_ratio/layer_0"]) - 6 / 16) < 1e-6 and abs(float(out["zero_ratio/layer_1"]) - 10 / 16) < 1e-6
    assert abs(float(out["real_experts_per_token"]) - 2 * (1 - 0.5)) < 1e-6


def test_weighted_mean_propagates_nan():
    m = WeightedMean()
    m.update(torch.tensor(float("nan")), 3)
    m.update(torch.tensor(0.5), 3)
    assert torch.isnan(m.compute())
    m.reset()
    m.update(torch.tensor(1.0), torch.tensor(3))
    m.update(torch.tensor(2.0), torch.tensor(1))
    assert float(m.compute()) == 1.25
