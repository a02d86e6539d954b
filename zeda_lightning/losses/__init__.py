"""Losses as pure functions on tensors (fp32 inside, masked tokens ignored)."""

from zeda_lightning.losses.kd import cross_entropy, forward_kl, jsd, masked_mean, reverse_kl, token_kl
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

__all__ = [
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
