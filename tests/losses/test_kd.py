"""Distillation losses against hand computation and against the plain formulas."""

import math

import pytest
import torch

from zeda_lightning.losses import cross_entropy, forward_kl, jsd, reverse_kl, token_kl


def test_forward_and_reverse_kl_by_hand():
    s = torch.log(torch.tensor([[[0.5, 0.5]]]))
    t = torch.log(torch.tensor([[[0.9, 0.1]]]))
    fkl = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    rkl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert math.isclose(forward_kl(s, t).item(), fkl, rel_tol=1e-6)
    assert math.isclose(reverse_kl(s, t).item(), rkl, rel_tol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_forward_kl_matches_plain_formula_value_and_gradient(temperature):
    torch.manual_seed(0)
    s = torch.randn(3, 7, 11, requires_grad=True)
    t = torch.randn(3, 7, 11)
    mask = torch.rand(3, 7) > 0.3
    loss = forward_kl(s, t, mask, temperature, chunk=4)  # chunks that do not divide the 21 positions
    loss.backward()
    grad = s.grad.clone()
    s.grad = None
    ls, lt = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    ref = (token_kl(lt, ls) * mask).sum() / mask.sum()
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(grad, s.grad, atol=1e-6)


def test_jsd_limits_and_symmetric_point():
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 9), torch.randn(2, 5, 9)
    assert torch.allclose(jsd(s, t, beta=0.0), forward_kl(s, t), atol=1e-6)
    assert torch.allclose(jsd(s, t, beta=1.0), reverse_kl(s, t), atol=1e-6)
    ps, pt = s.softmax(-1), t.softmax(-1)
    m = (ps + pt) / 2
    ref = (0.5 * (pt * (pt / m).log()).sum(-1) + 0.5 * (ps * (ps / m).log()).sum(-1)).mean()
    assert torch.allclose(jsd(s, t, beta=0.5), ref, atol=1e-6)


def test_cross_entropy_ignores_masked_labels_and_is_zero_when_empty():
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 0.0]]])
    labels = torch.tensor([[1, -100]])
    assert math.isclose(cross_entropy(logits, labels).item(), -math.log(0.75), rel_tol=1e-6)
    assert cross_entropy(logits, torch.full((1, 2), -100)).item() == 0.0
