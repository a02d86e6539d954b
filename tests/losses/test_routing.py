"""Router losses against hand computation, and L_GA's equilibrium."""

import math

import pytest
import torch

from zeda_lightning.losses import group_aux_loss, router_z_loss, switch_load_balance_loss


def _softmax(row):
    z = sum(math.exp(x) for x in row)
    return [math.exp(x) / z for x in row]


def test_group_aux_loss_by_hand():
    # N = 4 real, N_Z = 2 zero, K = 2, T = 2
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 3.0, 2.5]])
    p = [_softmax(r) for r in logits.tolist()]
    # top-2 per token: token 0 -> {0 (real), 4 (zero)}; token 1 -> {4, 5} (both zero)
    f_zero = (1 + 2) / 2
    f_real = 2 - f_zero
    p_real = sum(sum(r[:4]) for r in p) / 2
    p_zero = sum(sum(r[4:]) for r in p) / 2
    alpha, w, n, nz, k = 0.1, 2.0, 4, 2, 2
    expected = alpha * (n + w * nz) / k * (f_real * p_real / n + f_zero * p_zero / (w * nz))
    got = group_aux_loss(logits, num_experts=4, top_k=2, alpha=alpha, w=w)
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_group_aux_loss_sigmoid_scores_renormalised():
    logits = torch.tensor([[1.0, -1.0, 0.5, 2.0]])  # N = 2, N_Z = 2, K = 1
    s = [1 / (1 + math.exp(-x)) for x in logits[0].tolist()]
    p = [x / sum(s) for x in s]
    # top-1 is index 3 (zero): f_Z = 1, f_E = 0
    expected = 0.1 * (2 + 2 * 2) / 1 * (0 + 1 * (p[2] + p[3]) / 4)
    got = group_aux_loss(logits, num_experts=2, top_k=1, score_func="sigmoid")
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_group_aux_loss_token_mask_and_gradient_only_through_probs():
    logits = torch.randn(6, 12, requires_grad=True)
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    full = group_aux_loss(logits[mask], num_experts=8, top_k=2)
    masked = group_aux_loss(logits, num_experts=8, top_k=2, token_mask=mask)
    assert torch.equal(full, masked)
    masked.backward()
    assert logits.grad[~mask].abs().sum() == 0 and logits.grad[mask].abs().sum() > 0
    empty = group_aux_loss(logits, num_experts=8, top_k=2, token_mask=torch.zeros(6, dtype=torch.bool))
    assert empty.item() == 0.0


@pytest.mark.parametrize("w, expected", [(2.0, 0.5), (1.0, 1 / 3)])
def test_group_aux_loss_drives_zero_share_to_target(w, expected):
    """Optimising free router logits under L_GA alone: zero share -> w N_Z / (w N_Z + N)."""
    torch.manual_seed(0)
    n, nz, k, t = 16, 8, 4, 512
    logits = torch.nn.Parameter(torch.randn(t, n + nz) - torch.tensor([0.0] * n + [3.0] * nz))  # start near 0 zero share
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        group_aux_loss(logits, num_experts=n, top_k=k, alpha=1.0, w=w).backward()
        opt.step()
    share = (logits.detach().softmax(-1).topk(k).indices >= n).float().mean().item()
    assert abs(share - expected) <= 0.05, share


def test_switch_load_balance_by_hand():
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    idx = torch.tensor([[0, 1], [1, 2]])  # counts: [1, 2, 1] over 4 assignments
    p = [_softmax(r) for r in logits.tolist()]
    pbar = [(p[0][i] + p[1][i]) / 2 for i in range(3)]
    expected = 3 * sum(f * q for f, q in zip([0.25, 0.5, 0.25], pbar))
    assert math.isclose(switch_load_balance_loss(logits, idx).item(), expected, rel_tol=1e-6)


def test_switch_balanced_equals_one():
    logits = torch.zeros(4, 4)
    idx = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert math.isclose(switch_load_balance_loss(logits, idx).item(), 1.0, rel_tol=1e-6)


def test_z_loss_by_hand_ignores_masked_columns():
    logits = torch.tensor([[0.0, math.log(3.0), float("-inf")]])
    assert math.isclose(router_z_loss(logits).item(), math.log(4.0) ** 2, rel_tol=1e-6)
