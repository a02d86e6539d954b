"""Stage 2's policy losses as components: YAML names one by ``class_path`` or by its shorthand (``ppo_clip``,
``exact_reverse_kl``), as it names the distillation objective; each is a callable on the training forward's
log-probabilities over the sampled responses and the rollout they were sampled in.

A rollout (``OnPolicyDistillModule.make_rollout``) holds ``input_ids`` (R, P + G), ``prompt_len`` P,
``response_mask`` (R, G), the sampled tokens' ``teacher_logp`` and ``old_logp`` (R, G), and, for a loss that asks for
it (:attr:`PolicyLoss.needs_teacher_distribution`), the teacher's full ``teacher_log_probs`` (R, G, V) in fp32.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from zeda_lightning.losses.component import Component, from_saved_config
from zeda_lightning.losses.kd import masked_mean, token_kl
from zeda_lightning.losses.policy import ppo_clip_loss, reverse_kl_advantage


class PolicyLoss(Component):
    """``(loss, clip_fraction) = policy_loss(log_probs (R, G, V) fp32, rollout)``: the student's log-distribution at
    each response position of its own samples, from the training forward."""

    #: ``True``: the rollout keeps the teacher's full log-distribution (R x G x V fp32), not only the sampled tokens'
    needs_teacher_distribution: ClassVar[bool] = False

    def __call__(self, log_probs: Tensor, rollout: dict) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class PPOClip(PolicyLoss):
    """ZEDA's stage 2: PPO-clip with the per-token advantage ``log pi_T(y_t) - log pi_S_old(y_t)`` (a single-sample
    estimate of the negative reverse KL), no KL or entropy term; ``clip_eps_high`` clips above 1 separately (DAPO)."""

    def __init__(self, clip_eps: float = 0.2, clip_eps_high: float | None = None) -> None:
        if not 0.0 < clip_eps < 1.0 or (clip_eps_high is not None and clip_eps_high <= 0.0):
            raise ValueError(f"PPOClip: clip_eps must be in (0, 1) and clip_eps_high > 0, got {clip_eps}, "
                             f"{clip_eps_high}")
        self.clip_eps, self.clip_eps_high = clip_eps, clip_eps_high

    def __call__(self, log_probs, rollout):
        tokens = rollout["input_ids"][:, rollout["prompt_len"]:]  # (R, G)
        logp = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        advantages = reverse_kl_advantage(rollout["teacher_logp"], rollout["old_logp"])
        return ppo_clip_loss(logp, rollout["old_logp"], advantages, rollout["response_mask"], self.clip_eps,
                             self.clip_eps_high)


class ExactReverseKL(PolicyLoss):
    """The exact reverse KL to the teacher at every sampled position, on the full distributions (the teacher is
    local, so no single-sample estimate is needed); nothing is clipped."""

    needs_teacher_distribution = True

    def __call__(self, log_probs, rollout):
        kl = token_kl(log_probs, rollout["teacher_log_probs"])  # (R, G)
        return masked_mean(kl, rollout["response_mask"]), torch.zeros((), device=log_probs.device)


#: shorthand names accepted in YAML (``policy_loss: ppo_clip``), built with the module's ``clip_eps`` knobs
POLICY_LOSSES: dict[str, type[PolicyLoss]] = {"ppo_clip": PPOClip, "exact_reverse_kl": ExactReverseKL}


def make_policy_loss(spec: str | PolicyLoss | dict, *, clip_eps: float = 0.2,
                     clip_eps_high: float | None = None) -> PolicyLoss:
    """The policy loss a config names: a :class:`PolicyLoss` as given, a shorthand built with the shared knobs, or a
    saved config of one of the package's policy losses (from a checkpoint)."""
    if isinstance(spec, PolicyLoss):
        return spec
    if isinstance(spec, dict):
        return from_saved_config(spec, list(POLICY_LOSSES.values()), "policy_loss")
    if not isinstance(spec, str) or spec not in POLICY_LOSSES:
        raise ValueError(f"policy_loss must be one of {sorted(POLICY_LOSSES)} or a PolicyLoss (class_path in YAML), "
                         f"got {spec!r}")
    return PPOClip(clip_eps, clip_eps_high) if spec == "ppo_clip" else ExactReverseKL()


__all__ = ["POLICY_LOSSES", "ExactReverseKL", "PPOClip", "PolicyLoss", "make_policy_loss"]
