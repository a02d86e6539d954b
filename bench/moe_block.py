"""Forward time of ONE MoE block with zero experts, relative to the unmodified block, per experts implementation.

What it measures
    One MoE block (router + experts, + the shared expert where the family has one) in eval under
    ``torch.no_grad``, timed as is ("original") and after ``inject(copy, ZeroExperts(seed=0))`` with:

    * ``0.0``  zero experts masked (``router.mask_zero = True``): same routing as the original, so the gap to the
      original is the injection overhead (wider router, pass-through hooks);
    * ``0.25 / 0.5 / 0.75``  ``router.zero_logit_bias`` calibrated by bisection on the bench input so that the
      realised share of zero slots (``selected_experts >= N``) is within ``--tol`` of the target (at T=1 the
      reachable shares are multiples of 1/K, so the tolerance is widened to half a slot there).

    The block is either
    * default: a 1-layer Qwen3-MoE sized like a scaled-down Qwen3-30B-A3B block (hidden 512, expert FFN 256,
      64 experts, top-8) at ``--tokens 1024``;
    * ``--shape qwen3_30b_a3b`` / ``--shape glm_4_7_flash``: the REAL block, built by transformers from the shipped
      real ``config.json`` cut to its dense prefix + 1 MoE layer (``zeda_lightning.slices.cut_config``; vocabulary
      cut to 128, which the block never touches) at tokens 1, 16, 512 and 4096. Qwen3: H 2048, 128 experts of FFN
      768, top-8 (2.4 GB of fp32 expert weights, one copy shared by both blocks). GLM-4.7-Flash: H 2048, 64
      experts of FFN 1536, top-4, sigmoid scoring with correction bias, one shared expert (always computed, in
      both). batched_mm runs at T=1 only there (at T=16 it would gather 2.4 GB of weights per forward).

    Every experts implementation that runs is measured in the same run: ``eager`` (per-expert loop over the hit
    experts), ``batched_mm`` (gathers one weight matrix per (token, slot): memory grows as T * K * 3 * H * I, so
    it runs only at T <= ``--batched-tokens``, or on the first ``--batched-tokens`` tokens when no T is that
    small) and ``grouped_mm`` (``torch._grouped_mm``; on CPU a loop over all N experts). The dispatch is checked,
    not assumed, once per implementation at its smallest T: the config value is asserted, the ATen ops of one
    forward are recorded (``bmm`` for batched_mm, ``_grouped_mm`` for grouped_mm, neither for eager), and the
    masked block's output equals the original's bit for bit.

Why
    Skipped slots are dropped by the sentinel-skip hooks (``zeda_lightning/adapters/skipping.py``) before any
    experts implementation runs, so the block's time should fall with the share of zero slots. The target: the
    fastest implementation at 0.5 zero slots takes at most 0.55x the fastest original (ideal 0.5x). It is a
    compute target only where compute or the hit experts' weight bytes fall with the share: the ``roofline`` per T
    (JSON) puts the routed-expert weight bytes read (distinct experts hit, measured and expected
    N * (1 - (1 - K'/N)^T) with K' the kept slots per token) beside the FLOPs, original vs 0.5, and the ratio
    max(bytes / BW, FLOPs / P) predicts, with BW and P the rates the original achieves in this run at its
    smallest and largest T.

How it is timed
    Per (implementation, T), each round runs ``original, v_a, original, v_b, ..., original`` with the variants in
    a fresh random order (``bench/_timing.py``), after untimed warm-up rounds. A variant's ratio is the median of
    its time over the mean of the two original runs around it; the ms columns are plain medians. The original and
    injected blocks share the expert weights (see ``build_models``). Rounds
    shrink with T under ``--shape`` on CPU (``--reps`` at T <= 64, about ``--reps * sqrt(64 / T)`` above, at least
    3) so each T costs
    about the same.

Threads
    ``--threads auto`` (default) keeps torch's default when the cores are idle, and uses 1 thread when other
    processes keep at least half a core busy: with several threads every OpenMP region then waits for a
    descheduled worker, and the block runs 10-150x slower (seen on a shared 2-core machine: eager 40 ms -> 7.5 s).
    The number used and the reason are printed and written to the JSON.

Output: a table (implementation x T x variant: ms, and ratio to the original) and ONE final JSON line on stdout;
``by_tokens: {T: {"fastest_ratio_at_0.5": ...}}`` is the fastest implementation's time at 0.5 over the fastest
original at that T.

    python bench/moe_block.py --quick                  # < 60 s on 2 idle cores (~30 s with 1 thread beside work)
    python bench/moe_block.py                          # a few minutes at most
    python bench/moe_block.py --shape qwen3_30b_a3b    # real size, fp32: ~15 min at 1 thread, ~3 GB
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import PreTrainedModel, Qwen3MoeConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ helpers when imported from elsewhere
from _moe import (  # noqa: E402
    IMPLS, SHAPES, Variant, build_model, injected_twin, make_variants, moe_blocks, real_config, routers, use_impl,
    zero_ratio,
)
from _timing import PairedTiming, time_paired  # noqa: E402

RATIOS = (0.0, 0.25, 0.5, 0.75)
TARGET_AT_HALF = 0.55
SHAPE_TOKENS = (1, 16, 512, 4096)
#: ATen ops whose presence identifies the implementation that actually ran (eager uses neither).
SIGNATURE_OPS = {"batched_mm": "aten.bmm", "grouped_mm": "aten._grouped_mm"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default=None,
                   help="the real block of a shipped config (default: the scaled-down Qwen3-like block below)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="tokens T fed to the block (default 1024; with --shape: 1 16 512 4096)")
    p.add_argument("--batched-tokens", type=int, default=None,
                   help="largest T for batched_mm (it gathers T*K*3*H*I weights per forward, 2.4 GB at T=16 with "
                        "--shape;\ndefault 32, with --shape 1)")
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                   help="with --shape: config.json values to replace (JSON values, e.g. hidden_size=256), for smoke\n"
                        "runs of the real block's code path at small sizes; recorded in the JSON")
    p.add_argument("--hidden", type=int, default=512, help="hidden size H (without --shape)")
    p.add_argument("--intermediate", type=int, default=256, help="expert FFN size I (without --shape)")
    p.add_argument("--experts", type=int, default=64, help="routed experts N (without --shape; N/2 zero experts)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token K (without --shape)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations")
    p.add_argument("--device", default="cpu", help="torch device (cuda times with a synchronize per forward)")
    p.add_argument("--reps", type=int, default=15, help="timed rounds at T <= 64 (fewer above; median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds at T <= 64 (1 above)")
    p.add_argument("--tol", type=float, default=0.01, help="allowed |realised - target| zero-slot ratio")
    p.add_argument("--threads", default="auto",
                   help="torch.set_num_threads: an integer, or 'auto' (torch's default on idle cores, 1 when other "
                        "processes\nkeep >= 0.5 core busy)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations to measure")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, input and the round order")
    p.add_argument("--quick", action="store_true", help="small run (< 60 s on 2 cores): 256 tokens (with --shape "
                                                        "1 and 16), 16 for batched_mm, 5 reps, 1 warm-up round")
    args = p.parse_args(argv)
    if args.tokens is None:
        args.tokens = list(SHAPE_TOKENS) if args.shape else [1024]
    if args.batched_tokens is None:
        args.batched_tokens = 1 if args.shape else 32
    if args.quick:
        args.tokens = [1, 16] if args.shape else [256]
        args.batched_tokens, args.reps, args.warmup = 16, 5, 1
    args.tokens = sorted(set(args.tokens))
    if args.override and not args.shape:
        p.error("--override needs --shape")
    try:
        args.overrides = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.override)}
    except ValueError as err:
        p.error(f"--override takes KEY=VALUE with a JSON value: {err}")
    return args


def reps_at(tokens: int, args: argparse.Namespace) -> tuple[int, int]:
    """(timed rounds, warm-up rounds) at ``tokens``: the full count up to 64 tokens (always without --shape or off
    the CPU), then ~1/sqrt(T), and no warm-up round above 512."""
    if tokens <= 64 or not args.shape or args.device != "cpu":
        return args.reps, args.warmup
    # above 512 tokens a forward allocates its large intermediates afresh anyway: no warm-up round
    reps = max(3, min(args.reps, round(args.reps * math.sqrt(64 / tokens))))
    return reps, min(args.warmup, 1 if tokens <= 512 else 0)


def batched_tokens(args: argparse.Namespace) -> list[int]:
    """The Ts batched_mm runs at: those <= --batched-tokens, else the cap itself (a prefix of the input)."""
    if "batched_mm" not in args.impls:
        return []
    small = [t for t in args.tokens if t <= args.batched_tokens]
    return small or [min(args.batched_tokens, max(args.tokens))]


# -- machine ---------------------------------------------------------------------------------------------------


def _load() -> float:
    """1-minute load average (an after-the-fact hint that other processes shared the cores)."""
    return round(os.getloadavg()[0], 2)


def _busy_cores(seconds: float = 1.0) -> float | None:
    """Cores kept busy by other processes while this one sleeps for ``seconds`` (Linux ``/proc/stat``)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks), ticks[3] + ticks[4]

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return None
    return (1 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def resolve_threads(arg: str) -> tuple[int, str]:
    """``(threads, reason)`` for ``--threads``; see the module docstring."""
    if arg != "auto":
        return int(arg), "--threads"
    busy = _busy_cores()
    if busy is not None and busy >= 0.5:
        return 1, f"auto: other processes keep {busy:.1f} cores busy"
    return torch.get_num_threads(), "auto: idle cores, torch default"


# -- models ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The dimensions the roofline needs, read from the built block."""

    hidden: int
    intermediate: int  # routed expert FFN size I
    experts: int  # N
    top_k: int  # K
    shared_intermediate: int  # FFN size of the shared expert(s), 0 when none
    itemsize: int

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.intermediate * self.itemsize  # gate, up, down

    def as_dict(self) -> dict:
        return {"hidden": self.hidden, "intermediate": self.intermediate, "experts": self.experts,
                "top_k": self.top_k, "zero_experts": self.experts // 2,
                "shared_intermediate": self.shared_intermediate, "bytes_per_weight": self.itemsize}


def build_models(args: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedModel]:
    """The original model (one MoE block: the real cut config with --shape, else the scaled-down Qwen3-like one)
    and an injected deep copy sharing its weights (only the routers are new). One copy of the experts halves the
    memory (2.4 GB at the real fp32 sizes); the shared weights cannot flatter either side through the cache: one
    expert is 19 MB (Qwen3) / 38 MB (GLM) against a 32 MB L3, and each forward streams its experts in id order."""
    dtype = DTYPES[args.dtype]
    if args.shape:
        cfg, _, _ = real_config(args.shape, moe_layers=1, vocab_size=128)
        cfg.update(args.overrides)
    else:
        cfg = Qwen3MoeConfig(
            vocab_size=128, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
            moe_intermediate_size=args.intermediate, num_experts=args.experts, num_experts_per_tok=args.top_k,
            norm_topk_prob=True,
        ).to_dict()
    original = build_model(cfg, dtype, args.seed, args.device)
    return original, injected_twin(original, args.seed, share=original.parameters())


def moe_block(model: PreTrainedModel) -> nn.Module:
    return moe_blocks(model)[0]


def block_shape(block: nn.Module, router: nn.Module) -> Shape:
    experts = block.experts
    shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
    down = experts.down_proj  # (N, H, I)
    return Shape(hidden=down.shape[1], intermediate=down.shape[2], experts=int(experts.num_experts),
                 top_k=int(router.top_k), shared_intermediate=shared.down_proj.weight.shape[1] if shared else 0,
                 itemsize=down.element_size())


class _OpRecorder(TorchDispatchMode):
    """Names of the ATen ops that run inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def check_dispatch(run: Callable[[], Tensor], impl: str) -> None:
    """Run one forward and assert that the ops of ``impl`` (and of no other implementation) executed."""
    with _OpRecorder() as rec:
        run()
    ran = {name for name, op in SIGNATURE_OPS.items() if op in rec.ops}
    expected = {impl} & set(SIGNATURE_OPS)
    assert ran == expected, f"{impl}: signature ops of {sorted(ran) or 'eager'} ran, expected {sorted(expected)}"


# -- timing ------------------------------------------------------------------------------------------------------


@dataclass
class ImplResult:
    impl: str
    tokens: int
    timing: PairedTiming
    realised: dict[str, float]  # variant label -> realised zero ratio

    @property
    def original_ms(self) -> float:
        return self.timing.baseline_s * 1e3

    def ms(self, label: str) -> float:
        return self.timing.seconds[label] * 1e3

    def ratio(self, label: str) -> float:
        return self.timing.ratio[label]


def _synced(fn: Callable[[], Tensor], device: torch.device) -> Callable[[], Tensor]:
    if device.type != "cuda":
        return fn

    def run() -> Tensor:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def bench_impl(impl: str, blocks: tuple[nn.Module, nn.Module], router: nn.Module, x: Tensor, variants: list[Variant],
               args: argparse.Namespace, rng: random.Random, check: bool) -> ImplResult:
    """With ``check``: the dispatch and the masked block's parity. Then the realised zero ratios and the timing."""
    original, injected = blocks

    def run_variant(v: Variant) -> Callable[[], Tensor]:
        def run() -> Tensor:
            v.apply(router)
            return injected(x)

        return _synced(run, x.device)

    run_original = _synced(lambda: original(x), x.device)
    runs = {v.label: run_variant(v) for v in variants}
    if check:
        for run in (run_original, *runs.values()):
            check_dispatch(run, impl)
        torch.testing.assert_close(runs["0.0"](), run_original(), rtol=0, atol=0)  # masked == original, bit for bit
    realised = {}
    for v in variants:
        v.apply(router)
        realised[v.label] = zero_ratio(router, x.reshape(-1, x.shape[-1]))
    reps, warmup = reps_at(x.shape[1], args)
    return ImplResult(impl, x.shape[1], time_paired(run_original, runs, reps, warmup, rng), realised)


# -- roofline ----------------------------------------------------------------------------------------------------


def expected_hit(shape: Shape, tokens: int, kept_per_token: float) -> float:
    """Expected distinct experts hit by ``tokens`` tokens with ``kept_per_token`` uniform slots each."""
    return shape.experts * (1 - (1 - kept_per_token / shape.experts) ** tokens)


def roofline(shape: Shape, tokens: int, routing: dict[str, Tensor], share: float) -> dict:
    """Routed-expert weight bytes read and FLOPs, original vs ``share`` skipped, for the measured routing
    (``routing[label]``: (T, K) expert ids, sentinel N on skipped slots); the shared expert is counted in both."""
    n, k = shape.experts, shape.top_k
    shared_bytes = 3 * shape.hidden * shape.shared_intermediate * shape.itemsize
    shared_flops = 2 * tokens * 3 * shape.hidden * shape.shared_intermediate
    out: dict = {}
    for label, ids in (("original", routing["original"]), (str(share), routing[str(share)])):
        kept = int((ids < n).sum())
        hit = int(torch.unique(ids[ids < n]).numel())
        out[label] = {
            "distinct_experts_hit": hit,
            "expected_distinct": round(expected_hit(shape, tokens, kept / tokens), 2),
            "weight_bytes": hit * shape.expert_bytes + shared_bytes,
            "flops": 2 * kept * 3 * shape.hidden * shape.intermediate + shared_flops,
        }
    o, s = out["original"], out[str(share)]
    out["bytes_ratio"] = round(s["weight_bytes"] / o["weight_bytes"], 4)
    out["flops_ratio"] = round(s["flops"] / o["flops"], 4)
    out["flops_per_byte_original"] = round(o["flops"] / o["weight_bytes"], 2)
    return out


def add_roofline_prediction(by_tokens: dict[int, dict]) -> None:
    """``roofline_ratio`` per T: max(bytes/BW, FLOPs/P) at 0.5 over the original's, with BW the weight bandwidth
    the fastest original achieves at the smallest T and P its FLOP rate at the largest T (needs two Ts)."""
    ts = sorted(by_tokens)
    if len(ts) < 2:
        return
    lo, hi = by_tokens[ts[0]], by_tokens[ts[-1]]
    bw = lo["roofline"]["original"]["weight_bytes"] / (lo["fastest_original_ms"] / 1e3)
    peak = hi["roofline"]["original"]["flops"] / (hi["fastest_original_ms"] / 1e3)
    for t in ts:
        r = by_tokens[t]["roofline"]
        o, s = r["original"], r["0.5"]
        model = [max(d["weight_bytes"] / bw, d["flops"] / peak) for d in (o, s)]
        r["achieved_GBps"] = round(o["weight_bytes"] / (by_tokens[t]["fastest_original_ms"] / 1e3) / 1e9, 2)
        r["achieved_GFLOPs"] = round(o["flops"] / (by_tokens[t]["fastest_original_ms"] / 1e3) / 1e9, 2)
        r["roofline_ratio"] = round(model[1] / model[0], 4)
        r["bound"] = "memory" if o["weight_bytes"] / bw >= o["flops"] / peak else "compute"
    for t in ts:
        by_tokens[t]["roofline"]["BW_GBps"] = round(bw / 1e9, 2)
        by_tokens[t]["roofline"]["P_GFLOPs"] = round(peak / 1e9, 2)


# -- report ------------------------------------------------------------------------------------------------------


def print_table(results: list[ImplResult], labels: list[str]) -> None:
    head = f"{'impl':<11} {'tokens':>6} {'original':>10}" + "".join(f" {'r=' + l:>17}" for l in labels)
    print(head)
    print("-" * len(head))
    for res in sorted(results, key=lambda r: (r.tokens, IMPLS.index(r.impl))):
        cells = "".join(f" {res.ms(l):8.2f} ({res.ratio(l):5.3f}x)" for l in labels)
        print(f"{res.impl:<11} {res.tokens:>6} {res.original_ms:8.2f}ms{cells}")
    print("cells: median ms (paired ratio variant / original, same impl and T); r=0.0: injected, zero experts masked")
    for res in results:
        zeros = ", ".join(f"{l} -> {res.realised[l]:.3f}" for l in labels)
        print(f"realised zero-slot ratio, {res.impl} (T={res.tokens}): {zeros}")


def tokens_summary(results: list[ImplResult]) -> dict:
    """One T: the best ratio, and the fastest implementation at 0.5 over the fastest original."""
    best = min(results, key=lambda r: r.ratio("0.5"))
    fastest = min(results, key=lambda r: r.ms("0.5"))
    fastest_orig = min(results, key=lambda r: r.original_ms)
    return {
        "impl": best.impl,
        "ratio_at_0.5": round(best.ratio("0.5"), 4),
        "fastest_impl_at_0.5": fastest.impl,
        "fastest_original_impl": fastest_orig.impl,
        # paired within one implementation when the fastest is the same one, else the ratio of the medians
        "fastest_ratio_at_0.5": round(fastest.ratio("0.5") if fastest is fastest_orig
                                      else fastest.ms("0.5") / fastest_orig.original_ms, 4),
        "fastest_original_ms": round(fastest_orig.original_ms, 3),
        "meets_target": (fastest.ratio("0.5") if fastest is fastest_orig
                         else fastest.ms("0.5") / fastest_orig.original_ms) <= TARGET_AT_HALF,
        "by_impl": {r.impl: {l: round(r.ratio(l), 4) for l in r.timing.ratio} for r in results},
        "original_ms": {r.impl: round(r.original_ms, 3) for r in results},
        "variant_ms": {r.impl: {l: round(sec * 1e3, 3) for l, sec in r.timing.seconds.items()} for r in results},
        "realised_zero_ratio": {r.impl: {l: round(z, 4) for l, z in r.realised.items()} for r in results},
    }


def summary(results: list[ImplResult], rooflines: dict[int, dict], shape: Shape, args: argparse.Namespace) -> dict:
    """The final JSON: ``by_tokens`` per T; the top-level keys repeat the largest T (every impl that ran there,
    batched_mm at its largest T when it ran on a prefix; ``fastest_*`` only among the impls at that T)."""
    by_tokens = {}
    for t in args.tokens:
        at_t = [r for r in results if r.tokens == t]
        if at_t:
            by_tokens[t] = {**tokens_summary(at_t), "roofline": rooflines[t]}
    add_roofline_prediction(by_tokens)
    top_t = max(args.tokens)
    same_t = [r for r in results if r.tokens == top_t]
    top = same_t + [max((r for r in results if r.impl == i), key=lambda r: r.tokens) for i in args.impls
                    if i not in {r.impl for r in same_t} and any(r.impl == i for r in results)]
    head = tokens_summary(top)
    fastest = tokens_summary(same_t)  # times compare only at the same T (batched_mm may have run on a prefix)
    return {
        "shape_name": args.shape or "scaled_qwen3_like",
        "impl": head["impl"],
        "ratio_at_0.5": head["ratio_at_0.5"],
        "target_at_0.5": TARGET_AT_HALF,
        "meets_target": head["ratio_at_0.5"] <= TARGET_AT_HALF,
        "fastest_impl_at_0.5": fastest["fastest_impl_at_0.5"],
        "fastest_ratio_at_0.5": fastest["fastest_ratio_at_0.5"],
        "by_impl": head["by_impl"],
        "original_ms": head["original_ms"],
        "variant_ms": head["variant_ms"],
        "realised_zero_ratio": head["realised_zero_ratio"],
        "tokens": top_t,
        "tokens_by_impl": {r.impl: r.tokens for r in top},
        "by_tokens": by_tokens,
        "batched_mm_tokens": batched_tokens(args),
        "threads": torch.get_num_threads(),
        "threads_reason": args.threads_reason,
        "dtype": args.dtype,
        "device": args.device,
        "shape": shape.as_dict(),
        "overrides": args.overrides,
        "reps": {t: reps_at(t, args)[0] for t in args.tokens},
        "load_avg_end": _load(),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads, args.threads_reason = resolve_threads(args.threads)
    torch.set_num_threads(threads)
    models = build_models(args)
    blocks = tuple(moe_block(m) for m in models)
    router = routers(models[1])[0]
    shape = block_shape(blocks[0], router)
    print(f"torch {torch.__version__}, threads {threads} ({args.threads_reason}), {args.shape or 'scaled-down'}: "
          f"H={shape.hidden} I={shape.intermediate} N={shape.experts} K={shape.top_k} "
          f"shared I={shape.shared_intermediate}, "
          f"{args.dtype} on {args.device}, tokens {args.tokens} (batched_mm {batched_tokens(args)}), "
          f"load average {_load()}", flush=True)
    rng = random.Random(args.seed)
    t_max = max(args.tokens + batched_tokens(args))
    x_full = torch.randn(1, t_max, shape.hidden, generator=torch.Generator().manual_seed(args.seed + 1))
    x_full = x_full.to(device=args.device, dtype=DTYPES[args.dtype])
    results, rooflines, checked = [], {}, set()
    with torch.no_grad():
        for tokens in sorted(set(args.tokens + batched_tokens(args))):
            x = x_full[:, :tokens].contiguous()
            h = x.reshape(-1, shape.hidden)
            # at small T the reachable shares are multiples of 1 / (T K): allow half a slot
            tol = max(args.tol, 0.5 / (tokens * shape.top_k) + 1e-9)
            variants = make_variants(router, h, RATIOS, tol)  # the routing does not depend on the implementation
            if tokens in args.tokens:
                routing = {"original": routers(models[0])[0](h)[2]}
                half = next(v for v in variants if v.label == "0.5")
                half.apply(router)
                routing["0.5"] = router(h)[2]
                rooflines[tokens] = roofline(shape, tokens, routing, 0.5)
            for impl in args.impls:
                if tokens not in (batched_tokens(args) if impl == "batched_mm" else args.tokens):
                    continue
                use_impl(models, impl)
                t0 = time.perf_counter()
                results.append(bench_impl(impl, blocks, router, x, variants, args, rng, check=impl not in checked))
                checked.add(impl)
                res = results[-1]
                print(f"  {impl} T={tokens}: done in {time.perf_counter() - t0:.1f}s; "
                      f"original {res.original_ms:.2f} ms, "
                      + ", ".join(f"{l}: {res.ms(l):.2f} ms ({res.ratio(l):.3f}x)" for l in res.timing.ratio),
                      file=sys.stderr, flush=True)
    print()
    print_table(results, [str(r) for r in RATIOS])
    print(f"load average at the end: {_load()} (other processes on the cores inflate and scatter the times)")
    out = summary(results, rooflines, shape, args)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
