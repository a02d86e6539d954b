"""Projected end-to-end prefill and decode speedup of zero experts on the full Qwen3-30B-A3B and GLM-4.7-Flash, from
components measured at their real sizes.

What it measures
    Per model, transformers' own model class built from the shipped real ``config.json`` cut to its dense prefix +
    1 MoE layer (``zeda_lightning.slices.cut_config``: Qwen3 1 layer, GLM the dense first layer + 1 MoE layer),
    real vocabulary, random fp32 weights, eval, ``torch.no_grad``. Its injected twin (``inject(copy,
    ZeroExperts(seed=0))``) shares every weight with it except the new routers. Forward hooks time, inside each
    forward: the embedding, every decoder layer (and its attention and MLP), the LM head, and the rest (rotary,
    masks, final norm). Variants, timed paired against the original (``bench/_timing.py``):

    * ``0.0``  zero experts masked: the injection's overhead;
    * ``--share`` (0.5)  ``router.zero_logit_bias`` calibrated by bisection on the MoE block's own input for that
      phase (as ``bench/moe_block.py`` does) so that this share of the (token, slot) pairs goes to zero experts.

    Phases: ``prefill`` = ``--prefill-tokens`` (512) tokens, no cache, logits for the last token only
    (``logits_to_keep=1``, as ``generate`` asks); ``decode`` = 1 token against a ``StaticCache`` holding
    ``--kv`` (2048) tokens (filled by a real prefill; cropped back after every step). transformers' GLM attention
    caches MLA's 512 + 64 latent but re-expands K and V for every cached position at every step (``kv_b_proj``
    over the whole cache: ~19 GFLOP per layer per token at 2048 cached tokens), which serving engines avoid by
    absorbing ``kv_b_proj`` into the query and output projections; so GLM's decode attention here is far heavier
    than in SGLang, and its projected decode speedup is a lower bound.

The model (Amdahl over measured parts)
    t_full(v) = embed + lm_head + rest + n_dense * t_dense_layer + n_moe * t_moe_layer(v), with every part the
    original's median and t_moe_layer(v) = t_moe_layer(original) * (paired ratio of that layer under v); the
    speedup is t_full(original) / t_full(v). Qwen3-30B-A3B: 48 MoE layers; GLM-4.7-Flash: 1 dense + 46 MoE (47).
    Only what the layers do differs between the models' layers (same sizes), so one measured layer stands for
    all; KV length, batch 1 and fp32 on CPU at 1 thread are this bench's setting, not a GPU server's.

Why
    The block bench says what the experts gain; a user gets that only on the experts' share of the whole forward.
    ZEDA reports ~1.20x end to end (SGLang, H200, a kernel that skips zero slots).

Output: a table per model and phase and ONE final JSON line.

    python bench/e2e_projection.py            # ~10-15 min at 1 thread, ~6 GB peak (one model at a time)
    python bench/e2e_projection.py --quick    # prefill 64 tokens, KV 256, 3 rounds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, StaticCache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _moe import (  # noqa: E402
    SHAPES, Variant, build_model, injected_twin, make_variants, moe_blocks, real_config, routers,
)
from _timing import PairedTiming, time_paired_parts  # noqa: E402
from moe_block import resolve_threads  # noqa: E402

ZEDA_REPORTED = 1.20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=SHAPES, default=list(SHAPES), help="shipped real configs")
    p.add_argument("--share", type=float, default=0.5, help="zero-slot share of the skipping variant")
    p.add_argument("--prefill-tokens", type=int, default=512, help="tokens of the prefill forward")
    p.add_argument("--kv", type=int, default=2048, help="tokens in the KV cache of the decode step")
    p.add_argument("--reps", type=int, default=5, help="timed rounds per phase (medians)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per phase")
    p.add_argument("--tol", type=float, default=0.01, help="allowed |realised - target| zero share")
    p.add_argument("--threads", default="1", help="torch threads (an integer or 'auto', as moe_block)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="prefill 64 tokens, KV 256, 3 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.prefill_tokens, args.kv, args.reps = 64, 256, 3
    return args


class PartTimer:
    """Forward pre/post hooks that time named submodules inside one forward (CPU: the calls are synchronous)."""

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        self.start: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        for name, module in parts.items():
            module.register_forward_pre_hook(lambda m, a, n=name: self.start.__setitem__(n, time.perf_counter()))
            module.register_forward_hook(lambda m, a, o, n=name: self.seconds.__setitem__(
                n, time.perf_counter() - self.start[n]))

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def timed_parts(model: PreTrainedModel) -> PartTimer:
    """Hooks on the whole model, the embedding, every decoder layer (its attention and MLP) and the LM head."""
    parts: dict[str, nn.Module] = {"total": model, "embed": model.get_input_embeddings(),
                                   "lm_head": model.get_output_embeddings()}
    for i, layer in enumerate(model.get_decoder().layers):
        parts[f"layer{i}"], parts[f"attn{i}"], parts[f"mlp{i}"] = layer, layer.self_attn, layer.mlp
    return PartTimer(parts)


def with_rest(parts: dict[str, float], n_layers: int) -> dict[str, float]:
    layers = sum(parts[f"layer{i}"] for i in range(n_layers))
    return {**parts, "rest": parts["total"] - parts["embed"] - parts["lm_head"] - layers}


def block_input(model: PreTrainedModel, run: Callable[[], object]) -> Tensor:
    """The MoE block's input (T, H) during ``run`` (the router sees exactly this)."""
    seen: list[Tensor] = []
    block = moe_blocks(model)[0]
    handle = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def phase_calls(original: PreTrainedModel, twin: PreTrainedModel, phase: str, args: argparse.Namespace,
                gen: torch.Generator) -> tuple[Callable[[PreTrainedModel], None], str]:
    """A call running one forward of ``phase`` on a model, and a description of it."""
    vocab = original.config.vocab_size
    if phase == "prefill":
        ids = torch.randint(0, vocab, (1, args.prefill_tokens), generator=gen)
        return (lambda m: m(input_ids=ids, use_cache=False, logits_to_keep=1),
                f"{args.prefill_tokens} tokens, no cache, last-token logits")
    cache = StaticCache(config=original.config, max_cache_len=args.kv + 1)
    prompt = torch.randint(0, vocab, (1, args.kv), generator=gen)
    original(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)  # fill the cache
    step = torch.randint(0, vocab, (1, 1), generator=gen)

    def decode(m: PreTrainedModel) -> None:
        m(input_ids=step, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # back to --kv tokens for the next call

    return decode, f"1 token, StaticCache of {args.kv} tokens"


def project(timing: dict[str, PairedTiming], label: str, n_dense: int, n_moe: int, dense_idx: int | None,
            moe_idx: int) -> dict:
    """Amdahl over the measured parts (see the module docstring)."""
    base = {part: t.baseline_s for part, t in timing.items()}
    fixed = base["embed"] + base["lm_head"] + base["rest"]
    dense = base[f"layer{dense_idx}"] if dense_idx is not None else 0.0
    moe = base[f"layer{moe_idx}"]
    r_layer = timing[f"layer{moe_idx}"].ratio[label]
    full = fixed + n_dense * dense + n_moe * moe
    full_v = fixed + n_dense * dense + n_moe * moe * r_layer
    mlp = base[f"mlp{moe_idx}"]
    return {
        "projected_speedup": round(full / full_v, 4),
        "moe_layer_ratio": round(r_layer, 4),
        "moe_mlp_ratio": round(timing[f"mlp{moe_idx}"].ratio[label], 4),
        "mlp_share_of_full": round(n_moe * mlp / full, 4),  # Amdahl's fraction: the MoE blocks' share of time
        "speedup_if_moe_blocks_free": round(full / (full - n_moe * mlp), 4),
        "projected_full_ms": {"original": round(full * 1e3, 2), label: round(full_v * 1e3, 2)},
    }


def bench_model(name: str, args: argparse.Namespace, rng: random.Random) -> dict:
    cfg, full_cfg, n_dense = real_config(name, moe_layers=1)
    n_layers = cfg["num_hidden_layers"]
    n_moe_full = full_cfg["num_hidden_layers"] - n_dense
    t0 = time.perf_counter()
    original = build_model(cfg, torch.float32, args.seed)
    twin = injected_twin(original, args.seed, share=original.parameters())
    print(f"{name}: built {n_layers} layers ({n_dense} dense) in {time.perf_counter() - t0:.0f}s; full model "
          f"{n_dense} dense + {n_moe_full} MoE layers", flush=True)
    router = routers(twin)[0]
    timers = {id(m): timed_parts(m) for m in (original, twin)}
    gen = torch.Generator().manual_seed(args.seed + 1)
    out = {"layers_full": {"dense": n_dense, "moe": n_moe_full}, "phases": {}}
    with torch.no_grad():
        for phase in ("prefill", "decode"):
            call, what = phase_calls(original, twin, phase, args, gen)
            masked = Variant("0.0", mask_zero=True)
            masked.apply(router)
            h = block_input(twin, lambda: call(twin))
            variants = make_variants(router, h, [args.share], max(args.tol, 0.5 / (h.shape[0] * router.top_k)))

            def runner(model: PreTrainedModel, v: Variant | None) -> Callable[[], dict[str, float]]:
                def run() -> dict[str, float]:
                    if v is not None:
                        v.apply(router)
                    call(model)
                    return with_rest(timers[id(model)].take(), n_layers)

                return run

            t0 = time.perf_counter()
            timing = time_paired_parts(runner(original, None), {v.label: runner(twin, v) for v in variants},
                                       args.reps, args.warmup, rng)
            label = str(args.share)
            proj = project(timing, label, n_dense, n_moe_full, 0 if n_dense else None, n_dense)
            parts_ms = {part: round(t.baseline_s * 1e3, 3) for part, t in timing.items()}
            out["phases"][phase] = {
                "input": what,
                **proj,
                "masked_layer_ratio": round(timing[f"layer{n_dense}"].ratio["0.0"], 4),
                "measured_model_ratio": {v.label: round(timing["total"].ratio[v.label], 4) for v in variants},
                "original_parts_ms": parts_ms,
                "variant_parts_ms": {v.label: {part: round(t.seconds[v.label] * 1e3, 3)
                                               for part, t in timing.items()} for v in variants},
            }
            print(f"  {phase} ({what}): {time.perf_counter() - t0:.0f}s; parts ms {parts_ms}; MoE layer "
                  f"x{proj['moe_layer_ratio']} -> projected {proj['projected_speedup']}x", flush=True)
    del original, twin, timers
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads, reason = resolve_threads(args.threads)
    torch.set_num_threads(threads)
    rng = random.Random(args.seed)
    results = {name: bench_model(name, args, rng) for name in args.models}
    print()
    print(f"{'model':<15} {'phase':<8} {'MoE layer':>10} {'MoE share':>10} {'projected':>10} {'if MoE free':>12}")
    for name, res in results.items():
        for phase, r in res["phases"].items():
            print(f"{name:<15} {phase:<8} {r['moe_layer_ratio']:>9.3f}x {r['mlp_share_of_full']:>10.3f} "
                  f"{r['projected_speedup']:>9.3f}x {r['speedup_if_moe_blocks_free']:>11.3f}x")
    print(f"ZEDA reports ~{ZEDA_REPORTED}x end to end (SGLang on H200); these are fp32 CPU figures at {threads} "
          "thread(s), batch 1")
    out = {
        "share": args.share,
        "zeda_reported_speedup": ZEDA_REPORTED,
        "models": results,
        "prefill_tokens": args.prefill_tokens,
        "kv_tokens": args.kv,
        "reps": args.reps,
        "threads": threads,
        "threads_reason": reason,
        "dtype": "float32",
        "model": "t_full = embed + lm_head + rest + n_dense * dense_layer + n_moe * moe_layer * paired_ratio",
        "load_avg_end": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
