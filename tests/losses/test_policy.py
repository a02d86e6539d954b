"""On-policy losses against hand computation."""

import math

import torch

from zeda_lightning.losses import ppo_clip_loss, reverse_kl_advantage, sequence_logprobs


def test_advantage_is_teacher_minus_old_logprob():
    t = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.5, -0.5]])
    assert torch.equal(reverse_kl_advantage(t, old), torch.tensor([[0.5, -1.5]]))


def test_ppo_clip_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.7, 0.3, 0.55, 0.5]]))  # ratios 1.4, 0.6, 1.1, 1.0
    adv = torch.tensor([[1.0, -1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, clip_frac = ppo_clip_loss(new, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    # token 0: min(1.4*1, 1.28*1) = 1.28 (clipped); token 1: min(0.6*-1, 0.8*-1) = -0.8 (clipped);
    # token 2: min(1.1*2, 1.1*2) = 2.2; token 3 masked out
    expected = -(1.28 - 0.8 + 2.2) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    assert math.isclose(clip_frac.item(), 2 / 3, rel_tol=1e-6)


def test_ppo_gradient_zero_on_clipped_tokens():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.5, 0.05]], requires_grad=True)  # ratio e^0.5 = 1.65 (clipped), e^0.05 = 1.05
    adv = torch.tensor([[1.0, 1.0]])
    loss, _ = ppo_clip_loss(new, old, adv, torch.ones(1, 2, dtype=torch.bool), clip_eps=0.2)
    loss.backward()
    assert new.grad[0, 0] == 0 and math.isclose(new.grad[0, 1].item(), -math.exp(0.05) / 2, rel_tol=1e-5)


def test_sequence_logprobs():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert math.isclose(sequence_logprobs(logits, torch.tensor([[1]])).item(), math.log(0.75), rel_tol=1e-6)
