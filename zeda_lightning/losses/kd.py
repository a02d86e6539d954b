"""Distillation losses as pure functions on logits (fp32 inside, per-token mean over unmasked positions).

Shapes: logits (..., V) for student and teacher, ``mask`` (...) bool of positions that count (response tokens).
With no position left every loss is 0. ``temperature`` divides both logits (the usual T^2 factor is left to the
caller; with T = 1, the default, it does not matter).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the positions where ``mask`` is true; 0 when none is."""
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def token_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per position from log-probabilities ``(..., V)``; 0 * log 0 counts as 0."""
    p = log_p.exp()
    # NOTE: only exact zeros are dropped; a NaN stays NaN (``NaN > 0`` is False and would log a diverged KL as 0)
    return torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q)).sum(dim=-1)


class _ChunkedForwardKL(torch.autograd.Function):
    """Per-position KL(teacher || student) over chunks of positions, saving only the two logits tensors.

    The plain formula keeps about six (B, S, V) fp32 temporaries alive for backward; here the gradient
    ``(softmax(s/T) - softmax(t/T)) / T`` is rebuilt chunk by chunk. Inputs are (B, S, V) views (a shifted slice
    ``logits[:, :-1]`` is not copied). The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, temperature: float, chunk: int) -> Tensor:  # (B, S, V) x2 -> (B, S)
        out = torch.empty(s.shape[:2], dtype=torch.float32, device=s.device)
        for b in range(s.shape[0]):
            for i in range(0, s.shape[1], chunk):
                sl = slice(i, i + chunk)
                out[b, sl] = token_kl(_log_probs(t[b, sl], temperature), _log_probs(s[b, sl], temperature))
        ctx.save_for_backward(s, t)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        s, t = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        grad = torch.empty_like(s)
        for b in range(s.shape[0]):
            for i in range(0, s.shape[1], chunk):
                sl = slice(i, i + chunk)
                ps = F.softmax(s[b, sl].float() / temperature, dim=-1)
                pt = F.softmax(t[b, sl].float() / temperature, dim=-1)
                grad[b, sl] = ((ps - pt) * (grad_out[b, sl, None] / temperature)).to(s.dtype)
        return grad, None, None, None


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0,
    chunk: int = 256,
) -> Tensor:
    """KL(teacher || student): mass-covering, the standard KD objective. Computed in chunks of ``chunk`` positions
    with a hand-written backward (same value and gradient as the plain formula, a fraction of the memory)."""
    shape = student_logits.shape
    s = student_logits.reshape(-1, *shape[-2:]) if student_logits.dim() != 3 else student_logits
    t = teacher_logits.detach()
    t = t.reshape(-1, *shape[-2:]) if t.dim() != 3 else t
    per_token = _ChunkedForwardKL.apply(s, t, temperature, chunk)  # (B, S)
    return masked_mean(per_token.view(shape[:-1]), mask)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """KL(student || teacher): mode-seeking, what on-policy distillation minimises."""
    return masked_mean(token_kl(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)), mask)


def jsd(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, beta: float = 0.5, temperature: float = 1.0
) -> Tensor:
    """Generalised JSD (GKD): ``beta KL(T || M) + (1 - beta) KL(S || M)``, ``M = beta T + (1 - beta) S``.

    beta -> 0 approaches forward KL's gradient direction, beta -> 1 reverse KL's (as in TRL's ``generalized_jsd_loss``);
    beta = 0 and 1 are the exact forward and reverse KL.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must be in [0, 1], got {beta}")
    log_s, log_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    if beta == 0.0:
        return masked_mean(token_kl(log_t, log_s), mask)
    if beta == 1.0:
        return masked_mean(token_kl(log_s, log_t), mask)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0)
    per_token = beta * token_kl(log_t, log_m) + (1 - beta) * token_kl(log_s, log_m)
    return masked_mean(per_token, mask)


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Token-level CE on hard labels (already shifted), fp32; 0 when every label is ignored."""
    mask = labels != ignore_index
    per_token = F.cross_entropy(logits.float().flatten(0, -2), labels.clamp_min(0).flatten(), reduction="none")
    return masked_mean(per_token.view_as(labels), mask)
