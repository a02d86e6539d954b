"""The frozen teacher, held outside the training module's tree: checkpoints, the optimiser, ``train()`` and
Lightning's precision / device moves never see it; it is re-read from its own directory on resume."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel

from zeda_lightning.adapters.base import set_zero_mask
from zeda_lightning.sharding import is_sharded


@contextlib.contextmanager
def zero_experts_masked(model: nn.Module):
    """Temporarily mask the zero experts of every maskable router (the student becomes exactly the original)."""
    set_zero_mask(model, True)
    try:
        yield model
    finally:
        set_zero_mask(model, False)


class FrozenTeacher:
    """A frozen model (eval mode, no gradients) called like the student; not an ``nn.Module`` on purpose, so a
    LightningModule holding it does not register, save or train it."""

    def __init__(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        model.config.output_router_logits = False  # inference only: no balance loss to compute
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        """Teacher logits (B, S, V)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits

    def follow(self, student: nn.Module) -> None:
        """Move an unsharded teacher to the student's device and floating dtype (Lightning moved and cast the
        student; a ``*-true`` precision run computes both in the same dtype). A no-op once they agree."""
        if is_sharded(self.model) or isinstance(self.model, FullyShardedDataParallel):
            return  # sharded models live where their strategy put them
        ref = next(student.parameters())
        own = next(self.model.parameters())
        if own.device != ref.device or (ref.is_floating_point() and own.dtype != ref.dtype):
            self.model.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)

    def parameters(self):
        return self.model.parameters()

    def named_parameters(self):
        return self.model.named_parameters()

    def state_dict(self):
        return self.model.state_dict()
