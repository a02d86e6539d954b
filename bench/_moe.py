"""MoE helpers shared by the skipping benches (moe_block, e2e_projection, gpu_check): the real-size model cut to a
few layers, an injected twin, the MoE block, the experts implementation switch and the zero-share calibration.

Kept in one place so the block bench and the end-to-end projection build, inject and calibrate the same way.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from zeda_lightning.adapters import inject
from zeda_lightning.adapters.base import adapter_for
from zeda_lightning.analysis import zero_ratio as records_zero_ratio
from zeda_lightning.routing.zero_experts import ZeroExpertRouter, ZeroExperts
from zeda_lightning.slices import REAL_CONFIGS, cut_config, resolve_config
from zeda_lightning.solve import bisect_monotone

SHAPES = tuple(REAL_CONFIGS)  # the shipped real configs: qwen3_30b_a3b, glm_4_7_flash
IMPLS = ("eager", "batched_mm", "grouped_mm")
#: token ids a cut config may keep but a shrunk vocabulary cannot hold
_TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id")


# -- models ------------------------------------------------------------------------------------------------------


def real_config(name: str, moe_layers: int = 1, vocab_size: int | None = None) -> tuple[dict, dict, int]:
    """``(cut, full, dense)``: the shipped real ``config.json`` of ``name`` cut to its dense prefix plus
    ``moe_layers`` MoE layers (:func:`zeda_lightning.slices.cut_config`, the slices' own cut), the full dict, and
    the number of dense prefix layers. ``vocab_size`` shrinks the vocabulary (a block bench never embeds)."""
    with open(resolve_config(name), encoding="utf-8") as f:
        full = json.load(f)
    cut, dense = cut_config(full, moe_layers)
    if vocab_size is not None:
        cut["vocab_size"] = vocab_size
        for key in _TOKEN_KEYS:
            cut.pop(key, None)
    return cut, full, dense


def build_model(cfg: dict, dtype: torch.dtype, seed: int, device: str | torch.device = "cpu") -> PreTrainedModel:
    """transformers' own model class for ``cfg``, random weights from ``seed``, eval mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=dtype)
    return model.eval()


def injected_twin(original: PreTrainedModel, seed: int, share: Iterable[Tensor] = ()) -> PreTrainedModel:
    """A deep copy of ``original`` with ZEDA zero experts injected (N/2, router rows seeded). Tensors in ``share``
    (e.g. the embedding and LM head, whose work is the same in both) are shared instead of copied; everything else
    is copied, so the two never read the same expert weights (no cache reuse flattering either side)."""
    memo = {id(t): t for t in share}
    return inject(copy.deepcopy(original, memo), ZeroExperts(seed=seed)).eval()


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE blocks (router + experts) of ``model`` in layer order, as the package's adapter finds them."""
    return [block for _, block in adapter_for(model).find_blocks(model)]


def routers(model: nn.Module) -> list[nn.Module]:
    """The router of every MoE block of ``model`` (a ``ZeroExpertRouter`` once injected), in layer order."""
    adapter = adapter_for(model)
    return [getattr(block, adapter.router_attr) for _, block in adapter.find_blocks(model)]


def use_impl(models: Iterable[PreTrainedModel], impl: str) -> None:
    """Switch every model to ``impl`` and check that its experts modules (which dispatch on it) see it."""
    for model in models:
        model.set_experts_implementation(impl)
        for block in moe_blocks(model):
            seen = block.experts.config._experts_implementation
            assert seen == impl, f"asked for {impl!r}, the experts module dispatches on {seen!r}"


# -- zero-share calibration --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A setting of the injected routers: ``mask_zero`` (the original routing) or a zero-logit bias."""

    label: str
    mask_zero: bool = False
    bias: float = 0.0

    def apply(self, routers: ZeroExpertRouter | Iterable[ZeroExpertRouter]) -> None:
        for router in [routers] if isinstance(routers, ZeroExpertRouter) else routers:
            router.mask_zero, router.zero_logit_bias = self.mask_zero, self.bias


def zero_ratio(router: ZeroExpertRouter, h: Tensor) -> float:
    """Share of (token, slot) pairs routed to a zero expert for router input ``h`` (T, H)."""
    return records_zero_ratio([router.route(h)]).item()


def calibrate(router: ZeroExpertRouter, h: Tensor, target: float, tol: float, lo: float = -50.0,
              hi: float = 50.0) -> float:
    """Bisect ``zero_logit_bias`` until the realised zero share on ``h`` is within ``tol`` of ``target``."""
    router.mask_zero = False

    def ratio_at(bias: float) -> float:
        router.zero_logit_bias = bias
        return zero_ratio(router, h)

    bias, got = bisect_monotone(ratio_at, target, lo, hi, iters=100, tol=tol)
    if abs(got - target) > tol:
        raise RuntimeError(f"no zero_logit_bias reaches zero ratio {target} +/- {tol} "
                           f"(closest {got:.4f} at {bias:.4f})")
    return bias


def make_variants(router: ZeroExpertRouter, h: Tensor, ratios: Iterable[float], tol: float) -> list[Variant]:
    """``0.0`` (masked) and one calibrated bias per non-zero target share, for the router input ``h``."""
    variants = [Variant("0.0", mask_zero=True)]
    variants += [Variant(str(r), bias=calibrate(router, h, r, tol)) for r in ratios if r > 0]
    return variants
