"""Skipped slots cost no expert rows in any experts implementation, and training stays finite."""

import pytest
import torch

from tests.helpers import ExpertRowCounter
from zeda_lightning import ZeroExperts, capture_routing, inject
from zeda_lightning.losses import total_group_aux_loss
from zeda_lightning.tiny import tiny_model

IMPLS = ["eager", "batched_mm", "grouped_mm"]


def _experts(impl):
    model = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=0))
    model.set_experts_implementation(impl)
    return model, model.model.layers[0].mlp.experts


@pytest.mark.parametrize("impl", IMPLS)
def test_half_zero_slots_halve_expert_rows(impl):
    _, experts = _experts(impl)
    t, k = 64, 2
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(t, 32, generator=gen)
    idx = torch.randint(0, 8, (t, k), generator=gen)
    w = torch.rand(t, k, generator=gen)
    with ExpertRowCounter() as full:
        ref = experts(h, idx, w)
    skip = torch.rand(t, k, generator=gen) < 0.5
    skip[0] = True  # one token with every slot skipped
    with ExpertRowCounter() as half:
        out = experts(h, idx.masked_fill(skip, 8), w.masked_fill(skip, 0.0))
    kept = int((~skip).sum())
    assert full.rows == 2 * t * k  # up + down projection rows, every slot
    assert half.rows == 2 * kept  # only kept slots enter the matmuls
    assert kept < 0.6 * t * k
    # and the result equals the dense computation with the skipped slots' contribution removed
    with torch.no_grad():
        dense_kept = experts(h, idx, w.masked_fill(skip, 0.0))
    assert torch.allclose(out, dense_kept, atol=1e-6)
    assert torch.equal(out[0], torch.zeros(32))
    del ref


def test_all_slots_skipped_runs_no_real_rows():
    _, experts = _experts("grouped_mm")
    idx = torch.full((4, 2), 8)
    with ExpertRowCounter() as c:
        out = experts(torch.randn(4, 32), idx, torch.zeros(4, 2))
    assert c.rows <= 2 and torch.equal(out, torch.zeros(4, 32))  # one dummy row at most


def _train(impl, steps=6, seed=0):
    torch.manual_seed(seed)
    model = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=0))
    model.set_experts_implementation(impl)
    model.train()
    for r in model.modules():
        if hasattr(r, "zero_logit_bias"):
            r.zero_logit_bias = 1.0  # about half the slots on zero experts
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    losses, skipped, grads = [], [], None
    for step in range(steps):
        ids = torch.randint(0, 128, (4, 24), generator=gen)
        with capture_routing(model) as rec:
            out = model(ids, labels=ids)
        loss = out.loss + total_group_aux_loss(rec.values())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
        skipped.append(torch.cat([r.skipped.flatten() for r in rec.values()]).float().mean().item())
    return model, losses, skipped, grads


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_training_steps_finite_and_match_eager(impl):
    model, losses, skipped, grads = _train(impl)
    _, losses_eager, _, grads_eager = _train("eager")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert 0.2 < sum(skipped) / len(skipped) < 0.8  # the run really skipped slots
    # same first-step gradients as the eager experts (independent implementation of the same math)
    assert grads.keys() == grads_eager.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_eager[name], atol=1e-5, rtol=1e-4), name
    # zero-expert router rows get gradient through the K-slot renormalisation
    assert grads["model.layers.0.mlp.gate.weight"][8:].abs().sum() > 0
    assert max(abs(a - b) for a, b in zip(losses, losses_eager)) < 1e-3
