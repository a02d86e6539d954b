"""Inference compute-budget knob: pick the zero-slot ratio of a trained zero-expert model without retraining.

ZEDA fixes the skip ratio at training time (through L_GA's w). Here one additive bias per layer on the zero-expert
logits moves it: a larger bias sends more of each token's K slots to zero experts (less expert compute), a smaller
one fewer. For fixed router inputs, a layer's zero ratio is non-decreasing in its bias under every family's selection
rule (softmax top-K, sigmoid + correction bias with groups, GPT-OSS top-K on logits), so the bias that hits a target
is found by bisection.

Per layer (the default) rather than one global bias: layer l's ratio depends only on its own bias and the biases
of the layers before it, so calibrating the layers in order needs one forward per layer, each bisection runs on the
captured router logits (exact, no forward per step), and every layer spends the same share of its expert compute,
which keeps the saving predictable per layer (pipeline stages, latency). ``mode="global"`` keeps the trained
allocation across layers (one shared bias, a forward per bisection step); ``bench/budget.py`` compares both.

The biases are the routers' ``zero_logit_bias`` buffers, so an export carries its budget in its weights
(``from_pretrained`` restores it); ``model.config.zeda_budget`` (``config.json``) keeps a readable record.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer

from zeda_lightning.adapters import CONFIG_KEY
from zeda_lightning.analysis import zero_ratio
from zeda_lightning.data.files import load_rows
from zeda_lightning.export import (  # noqa: F401  (BUDGET_KEY: re-exported, the record's key)
    BUDGET_KEY,
    check_export_target,
    check_model_dir,
    export_model,
    from_pretrained,
    record_budget,
)
from zeda_lightning.routing import RouterOutput, capture_routing
from zeda_lightning.routing.base import BUDGET, iter_routers, supports
from zeda_lightning.routing.zero_experts import ZeroExpertRouter
from zeda_lightning.solve import bisect_monotone

Mode = Literal["per_layer", "global"]


def check_target(target: float) -> float:
    """A target zero ratio must lie in [0, 1): 1 would skip every expert of every token."""
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0.0 <= float(target) < 1.0:
        raise ValueError(f"budget target (zero-slot ratio) must be in [0, 1), got {target!r}; e.g. 0.3 to 0.7")
    return float(target)


def zero_routers(model: nn.Module) -> list[ZeroExpertRouter]:
    """The model's routers that take the zero-logit budget (:data:`~zeda_lightning.routing.base.BUDGET`), in layer
    order; a clear error if there are none to steer (a routing whose selection ignores the bias, like LongCat's
    controller or MoE++, would make calibration bisect a knob that does nothing)."""
    routers = sorted((m for m in iter_routers(model) if supports(m, BUDGET)), key=lambda r: r.layer_idx)
    routing = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    others = sorted({type(m).__name__ for m in iter_routers(model)} - {type(r).__name__ for r in routers})
    if others:
        raise ValueError(f"the model's routers {others} do not take the zero-logit budget (their selection ignores "
                         f"it; config {CONFIG_KEY}={routing!r}); calibrate a ZeroExperts student")
    if not routers:
        raise ValueError(
            f"the model has no zero-expert routers (config {CONFIG_KEY}={routing!r}); the budget knob needs a "
            "ZEDA student: a zeda export loaded with zeda_lightning.from_pretrained, or inject(model, ZeroExperts())"
        )
    if any(r.num_zero_experts == 0 for r in routers):
        raise ValueError("the model has ZeroExperts(num_zero_experts=0): there is no zero expert to send slots to")
    return routers


def zero_logit_biases(model: nn.Module) -> list[float]:
    return [float(r.zero_logit_bias) for r in zero_routers(model)]


def set_zero_logit_bias(model: nn.Module, bias: float | Sequence[float], record: dict[str, Any] | None = None) -> None:
    """Set the zero-logit bias of every router (one float, or one per layer) and record it in ``model.config``."""
    routers = zero_routers(model)
    values = [float(bias)] * len(routers) if isinstance(bias, (int, float)) else [float(b) for b in bias]
    if len(values) != len(routers):
        raise ValueError(f"{len(values)} zero-logit biases given for {len(routers)} zero-expert layers")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"zero-logit biases must be finite, got {values}")
    for r, v in zip(routers, values):
        r.zero_logit_bias = v  # into the float32 buffer: the record below says what it holds
    record_budget(model, record)


# -- measuring ----------------------------------------------------------------------------------------------------
def _concat(outs: list[RouterOutput]) -> RouterOutput:
    """One layer's router outputs of several forwards as one, tokens concatenated."""
    first = outs[0]
    return dataclasses.replace(first, **{
        f.name: torch.cat([getattr(o, f.name) for o in outs])
        for f in dataclasses.fields(first) if isinstance(getattr(first, f.name), Tensor)
    })


def _forward_routing(model: nn.Module, input_ids: Tensor, batch_size: int) -> dict[int, RouterOutput]:
    """Routing records (``{layer: RouterOutput}``) of every layer over ``input_ids`` (B, S), run in chunks of
    ``batch_size`` sequences."""
    chunks: dict[int, list[RouterOutput]] = {}
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            with capture_routing(model) as rec:
                model(input_ids[start : start + batch_size].to(model.device), use_cache=False)
            for layer, out in rec.items():
                chunks.setdefault(layer, []).append(out)
    return {layer: _concat(outs) for layer, outs in chunks.items()}


def measure_zero_ratio(model: nn.Module, input_ids: Tensor, batch_size: int = 8) -> dict[str, Any]:
    """Realised zero-slot share over ``input_ids`` (B, S) with no padding: overall and per layer."""
    records = _forward_routing(model, input_ids, batch_size)
    per_layer = {layer: zero_ratio([out]).item() for layer, out in records.items()}
    return {"zero_ratio": zero_ratio(records).item(), "per_layer": per_layer}


# -- calibrating --------------------------------------------------------------------------------------------------
def _solve(ratio_at: Callable[[float], float], target: float, iters: int) -> tuple[float, float]:
    """Bias ``b`` whose ``ratio_at(b)`` is closest to ``target`` (a non-decreasing step function of ``b``) and
    ``ratio_at(b)``: the bracket [-1, 1] grows by doubling up to +/-1e4, then bisects."""
    return bisect_monotone(ratio_at, target, -1.0, 1.0, iters=iters, grow_until=1e4)


def _layer_ratio_fn(router: ZeroExpertRouter, out: RouterOutput) -> Callable[[float], float]:
    """Zero ratio of one layer as a function of its bias, from its captured (unbiased) router logits."""
    n = router.num_experts
    logits = out.router_logits  # (T, N + N_Z), captured with this layer's bias at 0

    def ratio_at(b: float) -> float:
        # the same shift and selection rule as ZeroExpertRouter.route, so the ratio is exact for these inputs
        shifted = torch.cat([logits[:, :n], logits[:, n:] + b], dim=-1)
        idx, _ = router.scoring.select(shifted, n, router.top_k, router.e_score_correction_bias)
        return (idx >= n).float().mean().item()

    return ratio_at


def calibrate_zero_bias(
    model: nn.Module,
    input_ids: Tensor,
    target: float,
    mode: Mode = "per_layer",
    batch_size: int = 8,
    iters: int | None = None,
) -> dict[str, Any]:
    """Find zero-logit biases giving a zero-slot ratio of ``target`` on ``input_ids`` (B, S), set them on the
    routers and record them in ``model.config.zeda_budget``; returns that record.

    ``iters``: bisection steps (default 40 per layer, where a step costs no forward; 20 in global mode, where each
    step is a forward over the sample: bias resolution 2^-20 of the bracket either way is far below a slot)."""
    target = check_target(target)
    if mode not in ("per_layer", "global"):
        raise ValueError(f"mode must be 'per_layer' or 'global', got {mode!r}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"calibration input_ids must be a non-empty (B, S) tensor, got shape {tuple(input_ids.shape)}")
    routers = zero_routers(model)
    for r in routers:
        if r.mask_zero:
            raise ValueError(f"layer {r.layer_idx}: zero experts are masked (mask_zero=True); unmask them "
                             "(zeda_lightning.set_zero_mask(model, False)) before calibrating a budget")
        reachable = min(1.0, r.num_zero_experts / r.top_k)
        if target >= reachable:
            raise ValueError(f"target {target} is unreachable: with N_Z={r.num_zero_experts} zero experts and "
                             f"K={r.top_k} slots at most {reachable:.3f} of the slots can be zero")
    previous = [float(r.zero_logit_bias) for r in routers]
    try:
        if mode == "per_layer":
            for r in routers:
                r.zero_logit_bias = 0.0
            for i, r in enumerate(routers):  # layer i sees the final biases of layers < i
                out = _forward_routing(model, input_ids, batch_size)[r.layer_idx]
                r.zero_logit_bias, _ = _solve(_layer_ratio_fn(r, out), target, iters or 40)
        else:

            def global_ratio(b: float) -> float:
                for r in routers:
                    r.zero_logit_bias = b
                return measure_zero_ratio(model, input_ids, batch_size)["zero_ratio"]

            bias, _ = _solve(global_ratio, target, iters or 20)
            for r in routers:
                r.zero_logit_bias = bias
        realised = measure_zero_ratio(model, input_ids, batch_size)
    except BaseException:
        for r, b in zip(routers, previous):
            r.zero_logit_bias = b
        raise
    record = {
        "target": target,
        "mode": mode,
        "calibration_tokens": int(input_ids.numel()),
        "calibration_zero_ratio": round(realised["zero_ratio"], 6),
    }
    set_zero_logit_bias(model, [float(r.zero_logit_bias) for r in routers], record)
    return getattr(model.config, BUDGET_KEY)


# -- data ---------------------------------------------------------------------------------------------------------
def text_blocks(path: str, tokenizer, block_size: int = 256, max_blocks: int | None = None) -> Tensor:
    """Rows of a local text file (``text``, or ``prompt`` + ``response``) tokenised, joined with EOS and cut into
    full blocks ``(B, block_size)``: no padding, so every routed token counts. With ``max_blocks``, the blocks are
    spread evenly over the whole file, not its first rows: the skip ratio differs a lot between domains (code /
    prose / maths), so a calibration sample must cover the file's mix."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    ds = load_rows(path)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for row in ds:
        text = row.get("text") or ((row.get("prompt") or "") + (row.get("response") or ""))
        if not text and row.get("messages"):
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"{path}: {len(ids)} tokens, fewer than one block of {block_size}; give more text or a "
                         "smaller block_size")
    blocks = torch.tensor(ids[: n * block_size]).view(n, block_size)
    if max_blocks is not None and max_blocks < n:
        blocks = blocks[torch.linspace(0, n - 1, max_blocks).round().long()]
    return blocks


def budget_main(
    model: str,
    target: float,
    calibration: str,
    out: str,
    heldout: str | None = None,
    mode: Mode = "per_layer",
    block_size: int = 256,
    calibration_blocks: int = 16,
    heldout_blocks: int = 32,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Calibrate a zero-expert model to a target zero-slot ratio and export it with the budget in its config.

    Args:
        model: zeda export (transformers directory with ``zeda_routing`` in its config).
        target: zero-slot ratio to hit, in [0, 1); NLL stays near the teacher's up to about the ratio the student
            was trained to (bench/budget.py: tiny student, 0.46 trained, 1 % above the teacher at 0.5, 9 % at 0.6).
        calibration: local text file (jsonl/json/parquet/txt, gzipped too) to calibrate on; blocks are taken evenly
            over the whole file, a few thousand tokens of the serving mix do.
        out: export directory for the calibrated model.
        heldout: optional second file; the realised zero ratio on it is reported.
        mode: ``per_layer`` (every layer at the target) or ``global`` (one bias, trained allocation kept).
        block_size: tokens per calibration sequence.
        calibration_blocks: sequences of ``block_size`` tokens to calibrate on.
        heldout_blocks: sequences of the held-out file to measure on.
        overwrite: replace a non-empty ``out``.
    """
    check_target(target)
    if mode not in ("per_layer", "global"):
        raise ValueError(f"mode must be 'per_layer' or 'global', got {mode!r}")
    cfg = check_model_dir(model, require_routing=True, require_tokenizer=True)
    check_export_target(out, overwrite, protected=[model, calibration] + ([heldout] if heldout else []))
    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    calib = text_blocks(calibration, tok, block_size, calibration_blocks)
    held = text_blocks(heldout, tok, block_size, heldout_blocks) if heldout else None
    if block_size > cfg.get("max_position_embeddings", block_size):
        raise ValueError(f"block_size {block_size} exceeds the model's max_position_embeddings "
                         f"{cfg['max_position_embeddings']}")
    lm = from_pretrained(model)
    record = calibrate_zero_bias(lm, calib, target, mode)
    summary = {"target": target, "mode": mode, "calibration_zero_ratio": record["calibration_zero_ratio"],
               "zero_logit_bias": record["zero_logit_bias"]}
    if held is not None:
        summary["heldout_zero_ratio"] = round(measure_zero_ratio(lm, held)["zero_ratio"], 6)
        record["heldout_zero_ratio"] = summary["heldout_zero_ratio"]
    summary["out"] = export_model(lm, out, tok, overwrite=overwrite, protected=[model])
    return summary
