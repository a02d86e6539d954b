"""Forward time of ONE MoE block with zero experts, relative to the unmodified block, per experts implementation.

What it measures
    A 1-layer Qwen3-MoE causal LM, sized like a scaled-down Qwen3-30B-A3B block (hidden 512, expert intermediate
    256, 64 experts, top-8, fp32, eval, ``torch.no_grad``). Its MoE block ``model.model.layers[0].mlp`` (router +
    experts) is timed as is ("original") and after ``inject(copy, ZeroExperts(seed=0))`` with:

    * ``0.0``  zero experts masked (``router.mask_zero = True``): same routing as the original, so the gap to the
      original is the injection overhead (wider router, pass-through hooks);
    * ``0.25 / 0.5 / 0.75``  ``router.zero_logit_bias`` calibrated by bisection on the bench input so that the
      realised share of zero slots (``selected_experts >= N``) is within ``--tol`` of the target.

    Every experts implementation that runs on CPU is measured in the same run: ``eager`` (per-expert loop),
    ``batched_mm`` (gathers one weight matrix per (token, slot): memory grows as tokens * K * 3 * H * I, so it
    runs on the first ``--batched-tokens`` tokens only) and ``grouped_mm`` (``torch._grouped_mm`` on CPU).
    The dispatch is checked, not assumed: the config value is asserted and the ATen ops of one forward are
    recorded (``bmm`` for batched_mm, ``_grouped_mm`` for grouped_mm, neither for eager).

Why
    Skipped slots are dropped by the sentinel-skip hooks (``zeda_lightning/adapters/skipping.py``) before any
    experts implementation runs, so the block's time should fall with the share of zero slots. The issue's target:
    the best implementation at 0.5 zero slots takes at most 0.55x the original (ideal 0.5x).

How it is timed
    Per implementation, each round runs ``original, v_a, original, v_b, ..., original`` with the variants in a
    fresh random order, after ``--warmup`` untimed rounds. A variant's ratio is the median over ``--reps`` rounds
    of its time divided by the mean of the two original runs around it (same implementation, same input), so a
    slow stretch of a shared machine hits both sides; the ms columns are plain medians.

Threads
    ``--threads auto`` (default) keeps torch's default when the cores are idle, and uses 1 thread when other
    processes keep at least half a core busy: with several threads every OpenMP region then waits for a
    descheduled worker, and the block runs 10-150x slower (seen on a shared 2-core machine: eager 40 ms -> 7.5 s).
    The number used and the reason are printed and written to the JSON.

Output: a table (implementation x variant: ms, and ratio to the original) and ONE final JSON line on stdout.

    python bench/moe_block.py --quick   # < 60 s on 2 idle cores (~30 s with 1 thread beside other work)
    python bench/moe_block.py           # a few minutes at most
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3MoeConfig

from _timing import PairedTiming, time_paired  # bench/ is on sys.path when a bench runs as a script
from zeda_lightning.adapters import inject
from zeda_lightning.analysis import zero_ratio as records_zero_ratio
from zeda_lightning.routing.zero_experts import ZeroExpertRouter, ZeroExperts
from zeda_lightning.solve import bisect_monotone

IMPLS = ("eager", "batched_mm", "grouped_mm")
RATIOS = (0.0, 0.25, 0.5, 0.75)
TARGET_AT_HALF = 0.55
#: ATen ops whose presence identifies the implementation that actually ran (eager uses neither).
SIGNATURE_OPS = {"batched_mm": "aten.bmm", "grouped_mm": "aten._grouped_mm"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="tokens T fed to the block (eager, grouped_mm)")
    p.add_argument("--batched-tokens", type=int, default=32,
                   help="tokens for batched_mm, capped at --tokens (it gathers T*K*3*H*I weights per forward)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size H")
    p.add_argument("--intermediate", type=int, default=256, help="expert intermediate size I (moe_intermediate_size)")
    p.add_argument("--experts", type=int, default=64, help="routed experts N (the injection adds N/2 zero experts)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token K")
    p.add_argument("--reps", type=int, default=15, help="timed rounds per implementation (median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per implementation")
    p.add_argument("--tol", type=float, default=0.01, help="allowed |realised - target| zero-slot ratio")
    p.add_argument("--threads", default="auto",
                   help="torch.set_num_threads: an integer, or 'auto' (torch's default on idle cores, 1 when other "
                        "processes\nkeep >= 0.5 core busy)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations to measure")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, input and the round order")
    p.add_argument("--quick", action="store_true", help="small run (< 60 s on 2 cores): 256 tokens, 16 for "
                                                        "batched_mm, 5 reps, 1 warm-up round")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.batched_tokens, args.reps, args.warmup = 256, 16, 5, 1
    args.batched_tokens = min(args.batched_tokens, args.tokens)
    return args


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


def build_models(args: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedModel]:
    """The original 1-layer Qwen3-MoE LM and an injected deep copy (fp32, eval)."""
    config = Qwen3MoeConfig(
        vocab_size=128, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
        moe_intermediate_size=args.intermediate, num_experts=args.experts, num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
    )
    torch.manual_seed(args.seed)
    original = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    injected = inject(copy.deepcopy(original), ZeroExperts(seed=args.seed)).eval()
    return original, injected


def moe_block(model: PreTrainedModel) -> nn.Module:
    return model.model.layers[0].mlp


def use_impl(models: tuple[PreTrainedModel, ...], impl: str) -> None:
    """Switch every model to ``impl`` and check that the experts module (which dispatches on it) sees it."""
    for model in models:
        model.set_experts_implementation(impl)
        seen = moe_block(model).experts.config._experts_implementation
        assert seen == impl, f"asked for {impl!r}, the experts module dispatches on {seen!r}"


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


# -- zero-slot calibration ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A setting of the injected router: ``mask_zero`` or a zero-logit bias."""

    label: str
    mask_zero: bool = False
    bias: float = 0.0

    def apply(self, router: ZeroExpertRouter) -> None:
        router.mask_zero, router.zero_logit_bias = self.mask_zero, self.bias


def zero_ratio(router: ZeroExpertRouter, h: Tensor) -> float:
    """Share of (token, slot) pairs routed to a zero expert."""
    return records_zero_ratio([router.route(h)]).item()


def calibrate(router: ZeroExpertRouter, h: Tensor, target: float, tol: float, lo: float = -50.0,
              hi: float = 50.0) -> float:
    """Bisect ``zero_logit_bias`` until the realised zero ratio on ``h`` is within ``tol`` of ``target``."""
    router.mask_zero = False

    def ratio_at(bias: float) -> float:
        router.zero_logit_bias = bias
        return zero_ratio(router, h)

    bias, got = bisect_monotone(ratio_at, target, lo, hi, iters=100, tol=tol)
    if abs(got - target) > tol:
        raise RuntimeError(f"no zero_logit_bias reaches zero ratio {target} +/- {tol} (closest {got:.4f} at {bias:.4f})")
    return bias


def make_variants(router: ZeroExpertRouter, h: Tensor, tol: float) -> list[Variant]:
    """``0.0`` (masked) and one calibrated bias per non-zero target ratio, for the input ``h``."""
    variants = [Variant("0.0", mask_zero=True)]
    variants += [Variant(str(r), bias=calibrate(router, h, r, tol)) for r in RATIOS if r > 0]
    return variants


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


def bench_impl(impl: str, models: tuple[PreTrainedModel, PreTrainedModel], x: Tensor, variants: list[Variant],
               args: argparse.Namespace, rng: random.Random) -> ImplResult:
    """Check the dispatch and the masked block's parity, record the realised zero ratios, then time."""
    use_impl(models, impl)
    original, injected = (moe_block(m) for m in models)
    router = injected.gate

    def run_variant(v: Variant) -> Callable[[], Tensor]:
        def run() -> Tensor:
            v.apply(router)
            return injected(x)

        return run

    run_original = lambda: original(x)  # noqa: E731
    runs = {v.label: run_variant(v) for v in variants}
    for run in (run_original, *runs.values()):
        check_dispatch(run, impl)
    torch.testing.assert_close(runs["0.0"](), run_original(), rtol=0, atol=0)  # masked == original, bit for bit
    realised = {}
    for v in variants:
        v.apply(router)
        realised[v.label] = zero_ratio(router, x.reshape(-1, x.shape[-1]))
    return ImplResult(impl, x.shape[1], time_paired(run_original, runs, args.reps, args.warmup, rng), realised)


# -- report ------------------------------------------------------------------------------------------------------


def print_table(results: list[ImplResult], labels: list[str]) -> None:
    head = f"{'impl':<11} {'tokens':>6} {'original':>10}" + "".join(f" {'r=' + l:>17}" for l in labels)
    print(head)
    print("-" * len(head))
    for res in results:
        cells = "".join(f" {res.ms(l):8.2f} ({res.ratio(l):5.3f}x)" for l in labels)
        print(f"{res.impl:<11} {res.tokens:>6} {res.original_ms:8.2f}ms{cells}")
    print("cells: median ms (paired ratio variant / original, same impl); r=0.0: injected, zero experts masked")
    for res in results:
        zeros = ", ".join(f"{l} -> {res.realised[l]:.3f}" for l in labels)
        print(f"realised zero-slot ratio, {res.impl} (T={res.tokens}): {zeros}")


def summary(results: list[ImplResult], args: argparse.Namespace) -> dict:
    """The final JSON: ``impl`` is the implementation with the lowest ratio at 0.5 zero slots."""
    best = min(results, key=lambda r: r.ratio("0.5"))
    fastest = min(results, key=lambda r: r.ms("0.5"))
    return {
        "impl": best.impl,
        "ratio_at_0.5": round(best.ratio("0.5"), 4),
        "target_at_0.5": TARGET_AT_HALF,
        "meets_target": best.ratio("0.5") <= TARGET_AT_HALF,
        "fastest_impl_at_0.5": fastest.impl,
        "fastest_ratio_at_0.5": round(fastest.ratio("0.5"), 4),
        "by_impl": {r.impl: {l: round(r.ratio(l), 4) for l in r.timing.ratio} for r in results},
        "original_ms": {r.impl: round(r.original_ms, 3) for r in results},
        "variant_ms": {r.impl: {l: round(sec * 1e3, 3) for l, sec in r.timing.seconds.items()} for r in results},
        "realised_zero_ratio": {r.impl: {l: round(z, 4) for l, z in r.realised.items()} for r in results},
        "tokens": args.tokens,
        "tokens_by_impl": {r.impl: r.tokens for r in results},
        "threads": torch.get_num_threads(),
        "threads_reason": args.threads_reason,
        "shape": {"hidden": args.hidden, "intermediate": args.intermediate, "experts": args.experts,
                  "top_k": args.top_k, "zero_experts": args.experts // 2},
        "reps": args.reps,
        "load_avg_end": _load(),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads, args.threads_reason = resolve_threads(args.threads)
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, threads {threads} ({args.threads_reason}), H={args.hidden} "
          f"I={args.intermediate} N={args.experts} K={args.top_k}, tokens {args.tokens} (batched_mm "
          f"{args.batched_tokens}), reps {args.reps}, warmup {args.warmup}, load average {_load()}", flush=True)
    rng = random.Random(args.seed)
    models = build_models(args)
    router = moe_block(models[1]).gate
    x_full = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(args.seed + 1))
    results, variants_by_tokens = [], {}
    with torch.no_grad():
        for impl in args.impls:
            tokens = args.batched_tokens if impl == "batched_mm" else args.tokens
            x = x_full[:, :tokens].contiguous()
            if tokens not in variants_by_tokens:  # the routing does not depend on the implementation
                variants_by_tokens[tokens] = make_variants(router, x.reshape(-1, args.hidden), args.tol)
            t0 = time.perf_counter()
            results.append(bench_impl(impl, models, x, variants_by_tokens[tokens], args, rng))
            print(f"  {impl}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    print()
    print_table(results, [str(r) for r in RATIOS])
    print(f"load average at the end: {_load()} (other processes on the cores inflate and scatter the times)")
    out = summary(results, args)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
