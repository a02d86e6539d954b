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

The biases are recorded in ``model.config.zeda_budget`` so an export reloads with its budget (``from_pretrained``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zeda_lightning.adapters import CONFIG_KEY
from zeda_lightning.routing import capture_routing
from zeda_lightning.routing.zero_experts import ZeroExpertRouter

#: key of the recorded budget in ``model.config`` (and so in ``config.json``)
BUDGET_KEY = "zeda_budget"

Mode = Literal["per_layer", "global"]


def check_target(target: float) -> float:
    """A target zero ratio must lie in [0, 1): 1 would skip every expert of every token."""
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0.0 <= float(target) < 1.0:
        raise ValueError(f"budget target (zero-slot ratio) must be in [0, 1), got {target!r}; e.g. 0.3 to 0.7")
    return float(target)


def zero_routers(model: nn.Module) -> list[ZeroExpertRouter]:
    """The model's zero-expert routers in layer order; a clear error if there are none to steer."""
    routers = sorted((m for m in model.modules() if isinstance(m, ZeroExpertRouter)), key=lambda r: r.layer_idx)
    routing = getattr(getattr(model, "config", None), CONFIG_KEY, None)
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
        r.zero_logit_bias = v
    entry = dict(record or {})
    entry.update(layers=[r.layer_idx for r in routers], zero_logit_bias=values)
    setattr(model.config, BUDGET_KEY, entry)


def sync_budget_config(model: nn.Module) -> None:
    """Make ``config.zeda_budget`` say what the routers do (an export then reloads to the same model)."""
    routers = [m for m in model.modules() if isinstance(m, ZeroExpertRouter)]
    recorded = getattr(model.config, BUDGET_KEY, None)
    live = [float(r.zero_logit_bias) for r in sorted(routers, key=lambda r: r.layer_idx)]
    if recorded is None and not any(live):
        return
    if recorded is not None and recorded.get("zero_logit_bias") == live:
        return
    # the calibration record (target, ratios) no longer describes these biases: keep only what is true
    set_zero_logit_bias(model, live, {"source": "set on the routers, not calibrated"})


def apply_budget_config(model: nn.Module, where: str = "config") -> None:
    """Set the routers' biases from ``config.zeda_budget`` (called by ``from_pretrained``); errors name the field."""
    entry = getattr(model.config, BUDGET_KEY, None)
    if entry is None:
        return
    if not isinstance(entry, dict) or not isinstance(entry.get("zero_logit_bias"), list):
        raise ValueError(f"{where}: {BUDGET_KEY} must be a dict with a 'zero_logit_bias' list, got {entry!r}")
    routers = zero_routers(model)
    layers = entry.get("layers", [r.layer_idx for r in routers])
    if list(layers) != [r.layer_idx for r in routers]:
        raise ValueError(f"{where}: {BUDGET_KEY}.layers {layers} do not match the model's zero-expert layers "
                         f"{[r.layer_idx for r in routers]}; recalibrate with `python -m zeda_lightning budget`")
    set_zero_logit_bias(model, entry["zero_logit_bias"], entry)


# -- measuring ----------------------------------------------------------------------------------------------------
def _forward_routing(model: nn.Module, input_ids: Tensor, batch_size: int) -> dict[int, list]:
    """Router outputs of every layer over ``input_ids`` (B, S), in chunks of ``batch_size`` sequences."""
    records: dict[int, list] = {}
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            with capture_routing(model) as rec:
                model(input_ids[start : start + batch_size].to(model.device), use_cache=False)
            for layer, out in rec.items():
                records.setdefault(layer, []).append(out)
    return records


def measure_zero_ratio(model: nn.Module, input_ids: Tensor, batch_size: int = 8) -> dict[str, Any]:
    """Realised zero-slot share over ``input_ids`` (B, S) with no padding: overall and per layer."""
    records = _forward_routing(model, input_ids, batch_size)
    per_layer = {
        layer: torch.cat([o.skipped.flatten() for o in outs]).float().mean().item() for layer, outs in records.items()
    }
    return {"zero_ratio": sum(per_layer.values()) / len(per_layer), "per_layer": per_layer}


# -- calibrating --------------------------------------------------------------------------------------------------
def _solve(ratio_at: Callable[[float], float], target: float, iters: int) -> tuple[float, float]:
    """Bias ``b`` whose ``ratio_at(b)`` is closest to ``target``, for a non-decreasing step function; returns
    ``(b, ratio_at(b))``. Brackets by doubling, then bisects."""
    lo, hi = -1.0, 1.0
    r_lo, r_hi = ratio_at(lo), ratio_at(hi)
    while r_lo > target and lo > -1e4:
        lo *= 2
        r_lo = ratio_at(lo)
    while r_hi < target and hi < 1e4:
        hi *= 2
        r_hi = ratio_at(hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        r_mid = ratio_at(mid)
        if r_mid < target:
            lo, r_lo = mid, r_mid
        else:
            hi, r_hi = mid, r_mid
    return (lo, r_lo) if abs(r_lo - target) <= abs(r_hi - target) else (hi, r_hi)


def _layer_ratio_fn(router: ZeroExpertRouter, outs: list) -> Callable[[float], float]:
    """Zero ratio of one layer as a function of its bias, from its captured (unbiased) router logits."""
    n = router.num_experts
    logits = torch.cat([o.router_logits for o in outs])  # (T, N + N_Z), captured with this layer's bias at 0

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
    previous = [r.zero_logit_bias for r in routers]
    try:
        if mode == "per_layer":
            for r in routers:
                r.zero_logit_bias = 0.0
            for i, r in enumerate(routers):  # layer i sees the final biases of layers < i
                outs = _forward_routing(model, input_ids, batch_size)[r.layer_idx]
                r.zero_logit_bias, _ = _solve(_layer_ratio_fn(r, outs), target, iters or 40)
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
    set_zero_logit_bias(model, [r.zero_logit_bias for r in routers], record)
    return getattr(model.config, BUDGET_KEY)


# -- data ---------------------------------------------------------------------------------------------------------
def text_blocks(path: str, tokenizer, block_size: int = 256, max_blocks: int | None = None) -> Tensor:
    """Rows of a local text file (``text``, or ``prompt`` + ``response``) tokenised, joined with EOS and cut into
    full blocks ``(B, block_size)``: no padding, so every routed token counts. With ``max_blocks``, the blocks are
    spread evenly over the whole file, not its first rows: the skip ratio differs a lot between domains (code /
    prose / maths), so a calibration sample must cover the file's mix."""
    from zeda_lightning.data.module import load_rows

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
    from transformers import AutoTokenizer

    from zeda_lightning.export import _check_export_target, check_model_dir, export_model, from_pretrained

    check_target(target)
    if mode not in ("per_layer", "global"):
        raise ValueError(f"mode must be 'per_layer' or 'global', got {mode!r}")
    cfg = check_model_dir(model, require_routing=True, require_tokenizer=True)
    _check_export_target(out, overwrite, protected=[model, calibration] + ([heldout] if heldout else []))
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


def main(argv: list[str] | None = None) -> None:
    import json

    from jsonargparse import auto_cli

    print(json.dumps(auto_cli(budget_main, args=argv, as_positional=False)))
