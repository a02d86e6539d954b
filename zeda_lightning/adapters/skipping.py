"""The one place that owns sentinel handling for every experts implementation.

transformers 5.x experts take ``(hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K))``. An index equal to
``num_experts`` is meant as "skip", but only ``eager`` honours it everywhere: ``grouped_mm`` and ``batched_mm`` mask
it only on their expert-parallel path (otherwise skipped rows stay uninitialised or index out of range), and GPT-OSS's
eager one-hot has no class for it. So instead of trusting each kernel, a pre-hook drops the skipped (token, slot)
pairs before the experts run and a post-hook scatters the results back:

    kept (S' pairs) -> experts(hidden[tok] (S', H), ids (S', 1), weights (S', 1)) -> (S', H) -> summed per token

Every implementation then computes exactly S' rows, with no sentinel in sight. When no slot is skipped the call
passes through untouched, so a model with nothing skipped runs the original path bit for bit.

The one exception: transformers' generated ``eager`` loop (one-hot over ``num_experts + 1`` classes, the last one
skipped) honours the sentinel itself and visits only the experts hit, so under ``eager`` the skipped slots are just
set to the sentinel and the call keeps its (T, K) shape: the compaction's extra gather, the (S', H) output it zeroes
and the scatter back would cost more than they save there (measured at T = 4096 on the Qwen3-30B-A3B block).
GPT-OSS's eager loop has no sentinel class and keeps the compaction.

Zero-GEMM experts with a non-zero output (MoE++ copy / constant experts) are sentinel slots too; their router hands
the weighted sum of their outputs, (T, H), to :meth:`SentinelSkip.set_addend` and the post-hook adds it once.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor, nn


class SentinelSkip:
    """Forward pre/post hooks on one experts module; install with :func:`install_sentinel_skip`."""

    def __init__(self, experts: nn.Module) -> None:
        self.num_experts = int(experts.num_experts)
        self._names = list(inspect.signature(type(experts).forward).parameters)[1:4]
        self._ctx: tuple[int, int, Tensor, bool] | None = None
        self._addend: Tensor | None = None

    def set_addend(self, addend: Tensor | None) -> None:
        """A (T, H) term to add to the next experts output (zero-GEMM experts' weighted outputs), or None."""
        self._addend = addend

    def _unpack(self, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
        values = list(args) + [kwargs[n] for n in self._names[len(args):]]
        return values[0], values[1], values[2]

    def pre(self, module: nn.Module, args: tuple, kwargs: dict):
        hidden, index, weights = self._unpack(args, kwargs)  # (T, H), (T, K), (T, K)
        keep = index < self.num_experts  # (T, K)
        if bool(keep.all()):
            self._ctx = None
            return None
        if getattr(getattr(module, "config", None), "_experts_implementation", None) == "eager" and \
                eager_honours_sentinel(type(module)):
            self._ctx = None  # every skipped slot becomes the sentinel, which the eager loop never visits
            return (hidden, index.clamp(max=self.num_experts), weights), {}
        num_tokens, k = index.shape
        flat = keep.reshape(-1).nonzero().squeeze(1)  # (S',) kept pair ids
        empty = flat.numel() == 0
        if empty:  # every slot skipped: run one dummy row of weight 0 and discard it
            flat_call = torch.zeros(1, dtype=torch.long, device=index.device)
            w = weights.reshape(-1)[flat_call] * 0
        else:
            flat_call = flat
            w = weights.reshape(-1)[flat_call]
        self._ctx = (num_tokens, k, flat, empty)
        tok = flat_call // k  # (S',)
        ids = index.reshape(-1)[flat_call].clamp(max=self.num_experts - 1)  # (S',) all < N already, clamp for dummy
        return (hidden[tok], ids.unsqueeze(1), w.unsqueeze(1)), {}

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor):
        addend, self._addend = self._addend, None
        out = self._scatter_back(output)
        if addend is None:
            return out
        return (output if out is None else out) + addend.to(output.dtype)

    def _scatter_back(self, output: Tensor) -> Tensor | None:
        if self._ctx is None:
            return None
        num_tokens, k, flat, empty = self._ctx
        self._ctx = None
        hidden_dim = output.shape[-1]
        if empty:
            return output.new_zeros(num_tokens, hidden_dim)
        if output.device.type == "cpu":
            # NOTE: CPU index_add_ is sequential: kept slots are added per token in slot order, the same sum the
            # grouped/batched kernels form over K (skipped slots add exact zeros there), at a fraction of the cost
            return output.new_zeros(num_tokens, hidden_dim).index_add_(0, flat // k, output)  # (T, H)
        # accelerators: atomics would make index_add_ order-dependent, so scatter into slots and reduce over K
        buf = output.new_zeros(num_tokens * k, hidden_dim)
        buf[flat] = output  # (T*K, H)
        return buf.view(num_tokens, k, hidden_dim).sum(dim=1)  # (T, H)


@functools.cache
def eager_honours_sentinel(experts_cls: type) -> bool:
    """Does the class's own (``eager``) forward skip the sentinel id ``num_experts``? transformers' generated eager
    loops do (a one-hot over ``num_experts + 1`` classes whose last one is skipped); read once per class from its
    source, ``False`` where there is none to read."""
    forward = getattr(experts_cls.forward, "__wrapped__", experts_cls.forward)  # under use_experts_implementation
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return "num_classes=self.num_experts + 1" in source and "== self.num_experts" in source


def install_sentinel_skip(experts: nn.Module) -> SentinelSkip:
    """Idempotently hook ``experts`` so skipped slots cost no expert compute in any implementation."""
    existing = getattr(experts, "_zeda_skip", None)
    if existing is not None:
        return existing
    skip = SentinelSkip(experts)
    experts.register_forward_pre_hook(skip.pre, with_kwargs=True)
    experts.register_forward_hook(skip.post, with_kwargs=True)
    experts._zeda_skip = skip
    return skip
