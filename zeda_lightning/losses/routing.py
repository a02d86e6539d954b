"""Router losses as pure functions on routing tensors of one MoE layer.

Shapes: T tokens, N real experts, N_Z extra (zero / null) slots, P = N + N_Z pool, K slots per token.
All math in fp32. ``token_mask`` (T,) bool drops padding tokens; with no token left every loss is 0.
Sum the per-layer values over layers (``sum_over_layers``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def router_probs(router_logits: Tensor, score_func: str = "softmax") -> Tensor:
    """Full-pool distribution ``(T, P)``: softmax, or sigmoid scores renormalised over the pool (no bias)."""
    logits = router_logits.float()
    if score_func == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_func == "sigmoid":
        scores = torch.sigmoid(logits)
        return scores / scores.sum(dim=-1, keepdim=True)
    raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")


def _select_tokens(x: Tensor, token_mask: Tensor | None) -> Tensor:
    return x if token_mask is None else x[token_mask.reshape(-1).bool()]


def group_aux_loss(
    router_logits: Tensor,
    num_experts: int,
    top_k: int,
    *,
    alpha: float = 0.1,
    w: float = 2.0,
    score_func: str = "softmax",
    token_mask: Tensor | None = None,
) -> Tensor:
    """ZEDA's group auxiliary loss L_GA for one layer.

    ``L_GA = alpha * (N + w N_Z) / K * (f_E P_E / N + f_Z P_Z / (w N_Z))``.
    f_E, f_Z: real / zero slots per token (f_E + f_Z = K) from a plain top-K of the full-pool distribution (no bias,
    no groups, no gradient, as in the ZEDA code); P_E, P_Z: mean summed probability of each group (P_E + P_Z = 1).
    Its minimum puts a share ``w N_Z / (w N_Z + N)`` of the slots on zero experts.
    """
    logits = _select_tokens(router_logits, token_mask)  # (T, P)
    num_zero = logits.shape[-1] - num_experts
    if num_zero <= 0:
        raise ValueError(f"group_aux_loss needs zero experts in the pool: got {logits.shape[-1]} columns for N={num_experts}")
    if logits.shape[0] == 0:
        return router_logits.float().sum() * 0.0
    probs = router_probs(logits, score_func)  # (T, P)
    with torch.no_grad():
        top_idx = probs.topk(top_k, dim=-1).indices  # (T, K)
        f_zero = (top_idx >= num_experts).sum().float() / logits.shape[0]  # zero slots per token
        f_real = top_k - f_zero
    p_real = probs[:, :num_experts].sum(dim=-1).mean()
    p_zero = probs[:, num_experts:].sum(dim=-1).mean()
    scale = alpha * (num_experts + w * num_zero) / top_k
    return scale * (f_real * p_real / num_experts + f_zero * p_zero / (w * num_zero))


def switch_load_balance_loss(
    router_logits: Tensor,
    pool_indices: Tensor,
    *,
    score_func: str = "softmax",
    token_mask: Tensor | None = None,
) -> Tensor:
    """Switch/GShard balance over the whole pool: ``P * sum_i f_i * Pbar_i``.

    f_i is the fraction of the T*K assignments that went to slot i (counted with a bincount, no one-hot), Pbar_i the
    mean probability of slot i. Equals 1 at perfect balance. With null experts the pool holds the M null copies, so
    the optimum gives real experts a share rho of the slots.
    """
    logits = _select_tokens(router_logits, token_mask)  # (T, P)
    idx = _select_tokens(pool_indices, token_mask)  # (T, K)
    if logits.shape[0] == 0:
        return router_logits.float().sum() * 0.0
    pool = logits.shape[-1]
    probs = router_probs(logits, score_func)  # (T, P)
    counts = torch.bincount(idx.reshape(-1), minlength=pool).float()  # (P,)
    f = counts / idx.numel()
    return pool * (f * probs.mean(dim=0)).sum()


def router_z_loss(router_logits: Tensor, *, token_mask: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` (masked -inf columns drop out of the logsumexp)."""
    logits = _select_tokens(router_logits, token_mask).float()
    if logits.shape[0] == 0:
        return router_logits.float().sum() * 0.0
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def _layer_sum(values: Iterable[Tensor]) -> Tensor:
    values = list(values)
    if not values:
        raise ValueError("no routing records: run the forward inside `capture_routing(model)` first")
    return torch.stack(values).sum()


def total_group_aux_loss(records: Iterable, *, alpha: float = 0.1, w: float = 2.0, token_mask: Tensor | None = None):
    """L_GA summed over layers, from :class:`~zeda_lightning.routing.RouterOutput` records."""
    return _layer_sum(
        group_aux_loss(r.router_logits, r.num_experts, r.top_k, alpha=alpha, w=w, score_func=r.score_func,
                       token_mask=token_mask)
        for r in records
    )


def total_switch_load_balance_loss(records: Iterable, *, token_mask: Tensor | None = None) -> Tensor:
    """Switch balance over each layer's whole pool, summed over layers."""
    return _layer_sum(
        switch_load_balance_loss(r.router_logits, r.pool_indices, score_func=r.score_func, token_mask=token_mask)
        for r in records
    )


def total_router_z_loss(records: Iterable, *, token_mask: Tensor | None = None) -> Tensor:
    """Router z-loss summed over layers."""
    return _layer_sum(router_z_loss(r.router_logits, token_mask=token_mask) for r in records)
