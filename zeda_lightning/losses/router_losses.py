"""Router losses as components: YAML names one by ``class_path`` (or a shorthand, ``group``); each is a callable
on one forward's routing records and token mask, summed over layers. A loss that only makes sense for some routing
variants names the capability it needs (``requires``), which the training module checks before building anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from zeda_lightning.losses.component import Component, from_saved_config
from zeda_lightning.losses.routing import total_group_aux_loss, total_router_z_loss, total_switch_load_balance_loss


class RouterLoss(Component):
    """``loss = router_loss(records, token_mask (T,))``; ``records`` are one forward's per-layer routing records
    (``RouterOutput``: router_logits, pool_indices, num_experts, top_k, score_func)."""

    #: a routing capability the variant must declare (``"zero_slots"`` for L_GA), or ``None``
    requires: ClassVar[str | None] = None

    def __call__(self, records: Sequence, token_mask: Tensor | None) -> Tensor:
        raise NotImplementedError



def _zero(records: Sequence) -> Tensor:
    return records[0].router_logits.new_zeros((), dtype=torch.float32)


class GroupBalance(RouterLoss):
    """ZEDA's group balance loss L_GA: the zero-slot share settles at ``w N_Z / (w N_Z + N)`` (paper: alpha 0.1,
    w 2 -> 0.5)."""

    requires = "zero_slots"

    def __init__(self, alpha: float = 0.1, w: float = 2.0) -> None:
        if alpha < 0 or w <= 0:
            raise ValueError(f"GroupBalance: alpha must be >= 0 and w > 0, got alpha={alpha}, w={w}")
        self.alpha, self.w = alpha, w

    def __call__(self, records, token_mask):
        return _zero(records) + total_group_aux_loss(records, alpha=self.alpha, w=self.w, token_mask=token_mask)


class SwitchBalance(RouterLoss):
    """Switch-Transformer load balance over each layer's whole pool (null experts), times ``coef``."""

    def __init__(self, coef: float = 0.02) -> None:
        self.coef = coef

    def __call__(self, records, token_mask):
        return _zero(records) + self.coef * total_switch_load_balance_loss(records, token_mask=token_mask)


class RouterZLoss(RouterLoss):
    """ST-MoE router z-loss (mean squared log-sum-exp of the router logits), times ``coef``."""

    def __init__(self, coef: float = 1e-3) -> None:
        self.coef = coef

    def __call__(self, records, token_mask):
        return _zero(records) + self.coef * total_router_z_loss(records, token_mask=token_mask)


class NoRouterLoss(RouterLoss):
    """No router loss (the LongCat controller and static baselines set the share without one)."""

    def __init__(self) -> None:
        pass

    def __call__(self, records, token_mask):
        return _zero(records)


def mask_sparsity_loss(mask_probs: Tensor, skipped: Tensor | None = None, target: float | None = None,
                       token_mask: Tensor | None = None) -> Tensor:
    """One layer's BEAM ``L_reg``: the mean of ``mask_probs`` (T, K) over valid tokens' slots (an L1 norm, the
    probabilities being >= 0); with ``target``, times ``sign(target - skipped share)`` from ``skipped`` (T, K) bool,
    without gradient. 0 when no token is valid."""
    valid = None if token_mask is None else token_mask.reshape(-1).bool()
    probs = (mask_probs if valid is None else mask_probs[valid]).float()  # (T', K)
    if probs.numel() == 0:
        return mask_probs.float().sum() * 0.0
    loss = probs.mean()
    if target is not None:  # +1 while too few slots are skipped, -1 while too many
        share = (skipped if valid is None else skipped[valid]).float().mean()
        loss = loss * torch.sign(share.new_tensor(target) - share)
    return loss


class BeamSparsity(RouterLoss):
    """BEAM's sparsity term ``coef * L_reg`` (arXiv 2605.14438): ``L_reg`` is the L1 mean of the mask probabilities
    ``m_hat`` over each layer's valid top-K slots (the paper found L1 better than L2), summed over layers like the
    other router losses. It reads ``mask_probs`` (T, K) from BEAM's routing records.

    ``target`` (not in the paper, which sets the sparsity through ``coef`` alone): the skipped-slot share to hold.
    The term's sign then follows each layer's realised share (+coef while fewer slots are skipped than ``target``,
    -coef while more), so the frontier can match FLOPs with one run per target, as LongCat's controller does.
    ``None``: the paper's one-sided L1.
    """

    def __init__(self, coef: float = 0.1, target: float | None = None) -> None:
        if coef < 0:
            raise ValueError(f"BeamSparsity: coef must be >= 0, got {coef}")
        if target is not None and not 0.0 <= target <= 1.0:
            raise ValueError(f"BeamSparsity: target is a skipped-slot share in [0, 1], got {target}")
        self.coef, self.target = coef, target

    def to_config(self) -> dict[str, Any]:
        cfg = super().to_config()
        if self.target is None:  # saved configs hold numbers only; a missing target is the default None
            cfg["init_args"].pop("target")
        return cfg

    def __call__(self, records, token_mask):
        total = _zero(records)
        for r in records:
            if getattr(r, "mask_probs", None) is None:
                raise ValueError("BeamSparsity needs BEAM routing records (mask_probs): use routing "
                                 "zeda_lightning.routing.Beam with mask_zero=False")
            total = total + self.coef * mask_sparsity_loss(r.mask_probs, r.skipped, self.target, token_mask)
        return total


class SumOfRouterLosses(RouterLoss):
    """Several router losses added, in order."""

    def __init__(self, terms: list[RouterLoss]) -> None:
        self.terms = list(terms)
        needs = sorted({t.requires for t in self.terms} - {None})
        if len(needs) > 1:
            raise ValueError(f"SumOfRouterLosses: its terms require different routing capabilities {needs}")
        self.requires = needs[0] if needs else None

    def __call__(self, records, token_mask):
        total = _zero(records)
        for term in self.terms:
            total = total + term(records, token_mask)
        return total


#: shorthand names accepted in YAML (``aux_loss: group``), built with the module's ``group_*`` / ``switch_coef``
ROUTER_LOSSES = ("group", "switch", "none")


def _from_saved(cfg: Any) -> RouterLoss:
    simple = [GroupBalance, SwitchBalance, RouterZLoss, NoRouterLoss, BeamSparsity]
    sum_path = f"{SumOfRouterLosses.__module__}.{SumOfRouterLosses.__qualname__}"
    if isinstance(cfg, dict) and cfg.get("class_path") == sum_path:
        terms = (cfg.get("init_args") or {}).get("terms")
        if not isinstance(terms, list):
            raise ValueError(f"aux_loss: {cfg!r} has no list of terms")
        return SumOfRouterLosses([from_saved_config(t, simple, "aux_loss term") for t in terms])
    return from_saved_config(cfg, simple, "aux_loss")


def make_router_loss(spec: str | RouterLoss | dict, *, group_alpha: float = 0.1, group_w: float = 2.0,
                     switch_coef: float = 0.02, z_loss_coef: float = 0.0) -> RouterLoss:
    """The router loss a config names, plus the z-loss when ``z_loss_coef`` is set (shorthand or component alike);
    a saved config (from a checkpoint) already holds its z-loss term."""
    if isinstance(spec, dict):
        return _from_saved(spec)
    if isinstance(spec, RouterLoss):
        loss = spec
    elif spec == "group":
        loss = GroupBalance(alpha=group_alpha, w=group_w)
    elif spec == "switch":
        loss = SwitchBalance(coef=switch_coef)
    elif spec == "none":
        loss = NoRouterLoss()
    else:
        raise ValueError(f"aux_loss must be one of {list(ROUTER_LOSSES)} or a RouterLoss (class_path in YAML), got {spec!r}")
    if not z_loss_coef:
        return loss
    return SumOfRouterLosses([RouterZLoss(z_loss_coef)] if isinstance(loss, NoRouterLoss) else [loss, RouterZLoss(z_loss_coef)])
