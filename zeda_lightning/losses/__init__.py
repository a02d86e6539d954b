"""Losses as pure functions on tensors (fp32 inside, masked tokens ignored), and the objective / router-loss
components a config chooses by ``class_path`` (``objectives``, ``router_losses``)."""

from zeda_lightning.losses.kd import cross_entropy, forward_kl, jsd, masked_mean, reverse_kl, token_kl
from zeda_lightning.losses.objectives import JSD, OBJECTIVES, SFT, ForwardKL, Objective, ReverseKL, make_objective
from zeda_lightning.losses.policy import ppo_clip_loss, reverse_kl_advantage, sequence_logprobs
from zeda_lightning.losses.routing import (
    group_aux_loss,
    router_probs,
    router_z_loss,
    switch_load_balance_loss,
    total_group_aux_loss,
    total_router_z_loss,
    total_switch_load_balance_loss,
)
from zeda_lightning.losses.router_losses import (
    GroupBalance,
    NoRouterLoss,
    RouterLoss,
    RouterZLoss,
    SumOfRouterLosses,
    SwitchBalance,
    make_router_loss,
)

__all__ = [
    "JSD",
    "OBJECTIVES",
    "SFT",
    "ForwardKL",
    "GroupBalance",
    "NoRouterLoss",
    "Objective",
    "ReverseKL",
    "RouterLoss",
    "RouterZLoss",
    "SumOfRouterLosses",
    "SwitchBalance",
    "make_objective",
    "make_router_loss",
    "cross_entropy",
    "forward_kl",
    "jsd",
    "masked_mean",
    "ppo_clip_loss",
    "reverse_kl_advantage",
    "sequence_logprobs",
    "reverse_kl",
    "token_kl",
    "group_aux_loss",
    "router_probs",
    "router_z_loss",
    "switch_load_balance_loss",
    "total_group_aux_loss",
    "total_router_z_loss",
    "total_switch_load_balance_loss",
]
