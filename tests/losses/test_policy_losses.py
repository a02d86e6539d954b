"""Stage 2's policy losses as components, checked by hand on small tensors, and how a config names them."""

import math

import pytest
import torch

from zeda_lightning.losses.policy_losses import ExactReverseKL, PPOClip, make_policy_loss


def _rollout():
    # 1 response of 2 tokens over a vocabulary of 2, after a 1-token prompt; the second token is padding
    return {"input_ids": torch.tensor([[5, 0, 1]]), "prompt_len": 1, "response_mask": torch.tensor([[True, False]]),
            "teacher_logp": torch.tensor([[math.log(0.5), 0.0]]), "old_logp": torch.tensor([[math.log(0.25), 0.0]]),
            "teacher_log_probs": torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))}


def test_ppo_clip_by_hand():
    """Token 0 sampled at p_old 0.25, now 0.4; advantage ln 0.5 - ln 0.25 = ln 2 > 0; ratio 1.6 clipped to 1.2:
    loss = -1.2 ln 2, one clipped token of one."""
    log_probs = torch.log(torch.tensor([[[0.4, 0.6], [0.3, 0.7]]]))
    loss, clipped = PPOClip(clip_eps=0.2)(log_probs, _rollout())
    assert loss.item() == pytest.approx(-1.2 * math.log(2), rel=1e-6)
    assert clipped.item() == 1.0
    loss, clipped = PPOClip(clip_eps=0.2, clip_eps_high=1.0)(log_probs, _rollout())  # DAPO: room above 1
    assert loss.item() == pytest.approx(-1.6 * math.log(2), rel=1e-6) and clipped.item() == 0.0


def test_exact_reverse_kl_by_hand():
    """KL(student || teacher) at the one real position: 0.4 ln(0.4 / 0.5) + 0.6 ln(0.6 / 0.5); padding ignored."""
    log_probs = torch.log(torch.tensor([[[0.4, 0.6], [0.01, 0.99]]]))
    loss, clipped = ExactReverseKL()(log_probs, _rollout())
    assert loss.item() == pytest.approx(0.4 * math.log(0.8) + 0.6 * math.log(1.2), rel=1e-5)
    assert clipped.item() == 0.0 and ExactReverseKL.needs_teacher_distribution


def test_shorthands_configs_and_bad_names():
    assert isinstance(make_policy_loss("exact_reverse_kl"), ExactReverseKL)
    ppo = make_policy_loss("ppo_clip", clip_eps=0.1, clip_eps_high=0.28)
    assert (ppo.clip_eps, ppo.clip_eps_high) == (0.1, 0.28)
    saved = ppo.to_config()
    assert saved["class_path"] == "zeda_lightning.losses.policy_losses.PPOClip"
    again = make_policy_loss(saved)
    assert (again.clip_eps, again.clip_eps_high) == (0.1, 0.28)
    with pytest.raises(ValueError, match="policy_loss must be one of"):
        make_policy_loss("grpo")
    with pytest.raises(ValueError, match="clip_eps"):
        PPOClip(clip_eps=1.5)
