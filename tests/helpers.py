"""Test helpers: count the rows the expert matmuls really compute, build routers on hand-chosen logits."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zeda_lightning.adapters import adapter_for
from zeda_lightning.tiny import tiny_model


class ExpertRowCounter(TorchDispatchMode):
    """Counts token rows entering matmuls: mm/addmm input rows, bmm batch, grouped_mm rows below offs[-1]
    (the grouped kernel skips rows past the last offset)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        if name.startswith("_grouped_mm"):
            self.rows += int(args[2][-1])
        elif name.startswith(("mm.", "addmm.")):
            self.rows += (args[1] if name.startswith("addmm") else args[0]).shape[0]
        elif name.startswith("bmm."):
            self.rows += args[0].shape[0]
        return func(*args, **kwargs)


def router_on_logits(family: str, variant, logits_rows: torch.Tensor):
    """Build ``variant``'s router for a tiny ``family`` model whose pool logits equal ``logits_rows`` (P, H=32)
    for one-hot hidden states: token j (hidden e_j) gets logits ``logits_rows[:, j]``."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    _, block = adapter.find_blocks(model)[0]
    original = getattr(block, adapter.router_attr)
    router = variant.build(original, adapter.dims(original), adapter.scoring(original))
    with torch.no_grad():
        router.weight.copy_(logits_rows)
        if router.bias is not None:
            router.bias.zero_()
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.zero_()
    return router


def one_hot_tokens(num_tokens: int, hidden: int = 32) -> torch.Tensor:
    return torch.eye(hidden)[:num_tokens]
