"""Held-out NLL against the inference compute budget of the distilled tiny student (no retraining).

What it measures
    ``runs/tiny/student`` recalibrated with ``zeda_lightning.budget`` to each target zero-slot ratio in
    ``--targets``: biases fitted on ``--calibration-blocks`` blocks of the validation split, then, on the held-out
    test split (``--heldout-blocks`` blocks of ``--block-size`` tokens, no padding), the realised zero ratio (so the
    +/-0.02 claim is checked on text the calibration never saw) and the mean next-token NLL. Both calibration modes:
    ``per_layer`` (every layer at the target) and ``global`` (one shared bias). References on the same blocks: the
    teacher, the student as trained (bias 0), and the untrained matched-FLOPs baseline (the teacher with a static
    top-K' < K, ``StaticTopK``: zero ratio 1 - K'/K).

Output: a markdown table, a PNG (NLL against realised zero ratio) and ONE final JSON line.

    python bench/budget.py --quick    # 5 targets, per-layer only
    python bench/budget.py            # 9 targets, both modes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import AutoTokenizer

from moe_block import resolve_threads  # bench/ is on sys.path when a bench runs as a script
from zeda_lightning.adapters import inject
from zeda_lightning.budget import calibrate_zero_bias, measure_zero_ratio, set_zero_logit_bias, text_blocks
from zeda_lightning.export import from_pretrained
from zeda_lightning.fsio import atomic_write
from zeda_lightning.routing import StaticTopK


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="runs/tiny/student")
    p.add_argument("--teacher", default="assets/tiny_teacher")
    p.add_argument("--calibration", default="data/tiny_corpus/val.jsonl.gz")
    p.add_argument("--heldout", default="data/tiny_corpus/test.jsonl.gz")
    p.add_argument("--targets", default="0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8")
    p.add_argument("--modes", default="per_layer,global")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--calibration-blocks", type=int, default=16)
    p.add_argument("--heldout-blocks", type=int, default=32)
    p.add_argument("--out", default="runs/bench/budget", help="directory for budget_nll.png and budget.json")
    p.add_argument("--threads", default="auto")
    p.add_argument("--quick", action="store_true", help="targets 0.3,0.4,0.5,0.6,0.7, per_layer only")
    args = p.parse_args(argv)
    if args.quick:
        args.targets, args.modes = "0.3,0.4,0.5,0.6,0.7", "per_layer"
    return args


def heldout_nll(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL over full blocks (every block has the same number of predicted tokens)."""
    losses = []
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start : start + batch_size]
            losses.append(model(ids, labels=ids, use_cache=False).loss.item() * ids.shape[0])
    return sum(losses) / blocks.shape[0]


def plot(rows: list[dict], refs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, marker in (("per_layer", "o-"), ("global", "s--")):
        pts = sorted((r["heldout_zero_ratio"], r["nll"]) for r in rows if r["mode"] == mode)
        if pts:
            ax.plot(*zip(*pts), marker, label=f"student, budget ({mode.replace('_', '-')})")
    static = sorted((r["zero_ratio"], r["nll"]) for r in refs["static_topk"])
    ax.plot(*zip(*static), "^:", color="grey", label="teacher, static top-K' (untrained)")
    ax.plot([refs["student"]["zero_ratio"]], [refs["student"]["nll"]], "k*", ms=12, label="student as trained")
    ax.axhline(refs["teacher_nll"], color="k", lw=0.8, label="teacher (all K slots real)")
    ax.set_xlabel("held-out zero-slot ratio (share of expert FLOPs skipped)")
    ax.set_ylabel("held-out NLL (nats/token)")
    ax.set_ylim(refs["teacher_nll"] - 0.05, max(r["nll"] for r in rows) + 0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads, reason = resolve_threads(args.threads)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.student)
    calib = text_blocks(args.calibration, tok, args.block_size, args.calibration_blocks)
    held = text_blocks(args.heldout, tok, args.block_size, args.heldout_blocks)
    teacher, student = from_pretrained(args.teacher), from_pretrained(args.student)
    k = teacher.config.num_experts_per_tok
    refs = {
        "teacher_nll": heldout_nll(teacher, held),
        "student": {"zero_ratio": measure_zero_ratio(student, held)["zero_ratio"], "nll": heldout_nll(student, held)},
        "static_topk": [],
    }
    for kk in range(k - 1, 0, -1):
        static = inject(from_pretrained(args.teacher), StaticTopK(k=kk))
        refs["static_topk"].append({"k": kk, "zero_ratio": 1 - kk / k, "nll": heldout_nll(static, held)})
    print(f"threads {threads} ({reason}); calibration {tuple(calib.shape)} of {args.calibration}, held-out "
          f"{tuple(held.shape)} of {args.heldout}", file=sys.stderr)
    rows = []
    for mode in args.modes.split(","):
        for target in (float(t) for t in args.targets.split(",")):
            set_zero_logit_bias(student, 0.0)
            t0 = time.perf_counter()
            record = calibrate_zero_bias(student, calib, target, mode=mode)
            calib_s = time.perf_counter() - t0
            realised = measure_zero_ratio(student, held)
            rows.append({
                "mode": mode, "target": target,
                "calibration_zero_ratio": record["calibration_zero_ratio"],
                "heldout_zero_ratio": round(realised["zero_ratio"], 4),
                "heldout_error": round(realised["zero_ratio"] - target, 4),
                "heldout_per_layer": [round(v, 3) for v in realised["per_layer"].values()],
                "nll": round(heldout_nll(student, held), 4),
                "zero_logit_bias": [round(b, 3) for b in record["zero_logit_bias"]],
                "calibration_s": round(calib_s, 1),
            })
            r = rows[-1]
            print(f"{mode:9s} target {target:.2f} -> held-out {r['heldout_zero_ratio']:.3f} "
                  f"(err {r['heldout_error']:+.3f}) NLL {r['nll']:.4f}", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "budget_nll.png")
    plot(rows, refs, png)

    print(f"\nteacher NLL {refs['teacher_nll']:.4f}; student as trained: zero {refs['student']['zero_ratio']:.3f}, "
          f"NLL {refs['student']['nll']:.4f}")
    print("| mode | target | held-out zero ratio | error | held-out NLL | NLL / teacher |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['target']:.2f} | {r['heldout_zero_ratio']:.3f} | {r['heldout_error']:+.3f} | "
              f"{r['nll']:.4f} | {r['nll'] / refs['teacher_nll']:.3f} |")
    for s in refs["static_topk"]:
        print(f"| static top-{s['k']} (teacher) | - | {s['zero_ratio']:.3f} | - | {s['nll']:.4f} | "
              f"{s['nll'] / refs['teacher_nll']:.3f} |")
    result = {
        "bench": "budget",
        "threads": threads,
        "rows": rows,
        "teacher_nll": round(refs["teacher_nll"], 4),
        "student_as_trained": {k2: round(v, 4) for k2, v in refs["student"].items()},
        "static_topk": [{k2: round(v, 4) for k2, v in s.items()} for s in refs["static_topk"]],
        "max_abs_heldout_error": max(abs(r["heldout_error"]) for r in rows),
        "within_0_02": all(abs(r["heldout_error"]) <= 0.02 for r in rows),
        "png": png,
        "seconds": round(time.perf_counter() - start, 1),
    }
    with atomic_write(os.path.join(args.out, "budget.json")) as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
