"""Paired, interleaved timing shared by the benches: ratios that survive a busy machine.

Each round runs ``baseline, v_a, baseline, v_b, ..., baseline`` with the variants in a fresh random order. Every
variant run is divided by the mean of the two baseline runs around it, so a slow stretch of a shared machine hits
both sides of the ratio; medians over rounds.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class PairedTiming:
    baseline_s: float  # median over every timed baseline run
    seconds: dict[str, float]  # variant -> median seconds
    ratio: dict[str, float]  # variant -> median of (variant run / mean of the two baseline runs around it)


def wall_s(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_paired(baseline: Callable[[], object], variants: dict[str, Callable[[], object]], reps: int, warmup: int,
                rng: random.Random) -> PairedTiming:
    timed = time_paired_parts(lambda: {"total": wall_s(baseline)},
                              {name: (lambda fn=fn: {"total": wall_s(fn)}) for name, fn in variants.items()},
                              reps, warmup, rng)
    return timed["total"]


def time_paired_parts(baseline: Callable[[], dict[str, float]], variants: dict[str, Callable[[], dict[str, float]]],
                      reps: int, warmup: int, rng: random.Random) -> dict[str, PairedTiming]:
    """:func:`time_paired` for calls that time their own parts: each call returns ``{part: seconds}`` (the same
    parts every call), and every part gets its own paired ratio (e.g. one layer of a model timed by hooks)."""
    base: dict[str, list[float]] = {}
    seconds: dict[str, dict[str, list[float]]] = {}
    ratios: dict[str, dict[str, list[float]]] = {}
    for rnd in range(warmup + reps):
        order = list(variants)
        rng.shuffle(order)
        timed = rnd >= warmup
        before = baseline()
        if timed:
            for part, t in before.items():
                base.setdefault(part, []).append(t)
        for name in order:
            got = variants[name]()
            after = baseline()
            if timed:
                for part, t in got.items():
                    seconds.setdefault(part, {}).setdefault(name, []).append(t)
                    ratios.setdefault(part, {}).setdefault(name, []).append(t / ((before[part] + after[part]) / 2))
                    base[part].append(after[part])
            before = after
    med = statistics.median
    return {part: PairedTiming(med(base[part]), {n: med(v) for n, v in seconds[part].items()},
                               {n: med(v) for n, v in ratios[part].items()}) for part in seconds}
