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
    base: list[float] = []
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    for rnd in range(warmup + reps):
        order = list(variants)
        rng.shuffle(order)
        timed = rnd >= warmup
        before = wall_s(baseline)
        if timed:
            base.append(before)
        for name in order:
            t = wall_s(variants[name])
            after = wall_s(baseline)
            if timed:
                seconds[name].append(t)
                ratios[name].append(t / ((before + after) / 2))
                base.append(after)
            before = after
    med = statistics.median
    return PairedTiming(med(base), {n: med(v) for n, v in seconds.items()}, {n: med(v) for n, v in ratios.items()})
