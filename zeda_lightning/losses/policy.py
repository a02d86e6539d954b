"""On-policy distillation losses (ZEDA stage 2) as pure functions on per-token tensors.

Shapes: (B, G) for sampled response positions; ``mask`` (B, G) bool marks real response tokens.
The reward is the teacher: per-token advantage ``A_t = log pi_T(y_t) - log pi_S_old(y_t)``, a single-sample
estimate of the negative reverse KL; PPO-clip with no KL or entropy term.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zeda_lightning.losses.kd import masked_mean


def reverse_kl_advantage(teacher_logp: Tensor, old_logp: Tensor) -> Tensor:
    """``A_t = log pi_T(y_t) - log pi_S_old(y_t)`` (no gradient)."""
    return (teacher_logp.float() - old_logp.float()).detach()


def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO-clip policy loss, token-level mean over ``mask``; returns ``(loss, clip_fraction)``.

    ``loss_t = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps_high) A_t)`` with ``r_t = exp(logp_t - old_logp_t)``;
    ``eps_high`` defaults to ``eps`` (symmetric clipping). ``clip_fraction``: share of tokens whose clipped term is
    the one taken (no gradient flows through them).
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp.float() - old_logp.float())
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    clip_fraction = masked_mean((clipped < unclipped).float(), mask)
    return masked_mean(per_token, mask), clip_fraction.detach()


def sequence_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log softmax(logits)[tokens]`` per position, fp32: logits (B, G, V), tokens (B, G) -> (B, G)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
