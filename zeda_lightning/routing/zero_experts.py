"""ZEDA zero experts: N_Z parameter-free experts whose output is exactly 0, added to the router's pool.

Paper: "Post-Trained MoE Can Skip Half Experts via Self-Distillation" (arXiv 2605.18643); details follow its code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zeda_lightning.routing.scoring import compute_dtype
from zeda_lightning.routing.base import (
    BUDGET,
    MASKABLE,
    ZERO_SLOTS,
    BaseRouter,
    MoEDims,
    RouterOutput,
    RoutingVariant,
    register_routing,
)


#: name of the router's zero-logit bias buffer (state-dict key ``<router>.zero_logit_bias``)
BUDGET_BUFFER = "zero_logit_bias"


class ZeroExpertRouter(BaseRouter):
    """Family scoring over N + N_Z rows, top-K unchanged; zero slots become the sentinel with weight 0."""

    capabilities = frozenset({MASKABLE, ZERO_SLOTS, BUDGET})

    def __init__(self, dims: MoEDims, scoring, num_zero_experts: int, mask_zero: bool, **kw) -> None:
        super().__init__(dims, scoring, dims.num_experts + num_zero_experts, **kw)
        self.num_zero_experts = num_zero_experts
        #: True: zero experts can never be picked and the original op sequence runs (bit-identical teacher).
        self.mask_zero = mask_zero
        #: Additive bias on the zero-expert logits (inference compute knob; 0 during training): a persistent
        #: float32 0-d buffer, so the budget travels in the weights (``model.safetensors``, checkpoints) and a plain
        #: state-dict load restores it. ``router.zero_logit_bias = 1.5`` sets it in place; read it with ``float()``.
        self.zero_logit_bias = nn.Buffer(torch.zeros((), dtype=torch.float32))
        self._frozen_rows: tuple[Tensor, Tensor | None, Tensor | None] | None = None

    def __setattr__(self, name: str, value) -> None:
        if name == BUDGET_BUFFER and not isinstance(value, Tensor) and name in self.__dict__.get("_buffers", {}):
            with torch.no_grad():
                self._buffers[name].fill_(float(value))
            return
        super().__setattr__(name, value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + BUDGET_BUFFER
        if key not in state_dict and key in missing_keys:  # saved before the bias was a buffer: it keeps its value
            missing_keys.remove(key)

    def freeze_original_rows(self) -> None:
        """Keep a copy of the current real-expert rows for the masked path, so the masked router stays the
        original one while the live rows train (the shared-weights teacher). Costs N x H per layer."""
        self._frozen_rows = tuple(None if t is None else t.detach().clone() for t in self._real_logits())

    def _apply(self, fn, recurse=True):
        bias = self._buffers.get(BUDGET_BUFFER)
        out = super()._apply(fn, recurse)
        if self._frozen_rows is not None:  # follow .to(device) like a buffer, outside the state dict
            self._frozen_rows = tuple(None if t is None else fn(t) for t in self._frozen_rows)
        moved = self._buffers.get(BUDGET_BUFFER)
        if moved is not None and moved.dtype != torch.float32:  # model.to(bf16): the bias stays fp32, unrounded
            self._buffers[BUDGET_BUFFER] = bias.to(device=moved.device, dtype=torch.float32)
        return out

    def route(self, h: Tensor) -> RouterOutput:
        n, pool = self.num_experts, self.weight.shape[0]
        if self.mask_zero or self.num_zero_experts == 0:
            logits, weights, idx = self._original_route(h, rows=self._frozen_rows)  # (T, N), (T, K), (T, K)
            return self._output(self._pad_logits(logits, pool), weights, idx, None)
        logits = self.scoring.pool_logits(h, self.weight, self.bias)  # (T, N + N_Z) fp32
        # in place, with no host sync on the buffer; adding 0.0 leaves every logit as it was (bias 0: same routing)
        logits[:, n:].add_(self.zero_logit_bias)
        idx, top_scores = self._select(logits, n, self.top_k, self.e_score_correction_bias)  # (T, K)
        # NOTE: the family's renorm runs over all K slots, zero slots included (ZEDA code), before the drop.
        weights = self.scoring.combine(top_scores, compute_dtype(h))  # (T, K)
        return self._output(logits, weights, idx, idx >= n)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, N_Z={self.num_zero_experts}, mask_zero={self.mask_zero}"


@register_routing("zero_experts")
class ZeroExperts(RoutingVariant):
    """ZEDA zero experts.

    Args:
        num_zero_experts: N_Z extra router rows; ``None`` means N // 2 (the paper's setting).
        mask_zero: start with zero experts masked (the model is then exactly the original).
        seed: seed for the Gaussian init of the new router rows (``None``: torch's global RNG).
    """

    capabilities = ZeroExpertRouter.capabilities

    def __init__(self, num_zero_experts: int | None = None, mask_zero: bool = False, seed: int | None = None) -> None:
        if num_zero_experts is not None and num_zero_experts < 0:
            raise ValueError(
                f"ZeroExperts: num_zero_experts must be >= 0, got {num_zero_experts}; "
                "use None for the paper's N/2, or 0 for no zero experts"
            )
        self.num_zero_experts = num_zero_experts
        self.mask_zero = mask_zero
        self.seed = seed

    def resolve_num_zero(self, dims: MoEDims) -> int:
        return dims.num_experts // 2 if self.num_zero_experts is None else self.num_zero_experts

    def make_router(self, dims: MoEDims, scoring, **kw) -> ZeroExpertRouter:
        # NOTE: e_score_correction_bias grows N -> N + N_Z as N(mean, std) of the old entries and stays frozen.
        return ZeroExpertRouter(dims, scoring, self.resolve_num_zero(dims), self.mask_zero, **kw)
