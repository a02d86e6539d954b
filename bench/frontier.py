"""The frontier: held-out quality vs realised expert FLOPs, ZEDA against dynamic-MoE baselines, and where the
skipped compute falls.

Every method starts from the same frozen teacher (``assets/tiny_teacher``), trains with the same data, seed, step
budget, optimiser and forward-KL objective, and is measured on the held-out test split: NLL, KL to the teacher,
top-1 agreement, and the realised zero ratio / expert-FLOP fraction (methods are compared at realised, not nominal,
FLOPs). Each method's knob is set from the target zero ratio r:

    zeda            ZeroExperts (N_Z = N/2) + L_GA, w = r N / ((1 - r) N_Z)       (L_GA equilibrium share = r)
    null_experts    NullExperts rho = 1 - r, Switch balance over the pool
    adamoe          AdaMoE rho = 1 - r (independent null logits), Switch balance   (opt-in: --methods)
    top_p           TopP with p calibrated on the teacher so that its skip share is r; no aux loss
    static_topk     StaticTopK K' in {floor, ceil}(K (1 - r)) (it can only realise multiples of 1/K); no aux loss
    longcat         LongCatBias target = r, sign-update bias controller (callback), no aux loss
    moe_plus_plus   MoEPlusPlus (1 zero, 1 copy, 2 constant) + group balance w = r N / ((1 - r) N_zc)
    beam            Beam (sigmoid mask router on the top-K slots, STE) + BeamSparsity (L1 on the mask
                    probabilities) with target r: the term's sign follows the realised skipped share
    adaptive_k      AdaptiveK (entropy-gated top-k) with thresholds calibrated on the teacher so that its skip
                    share is r (training-free routing, then trained like top_p); no aux loss

Outputs (atomically) under ``--out``: ``frontier.csv`` (one row per run), ``frontier.png`` (NLL and KL vs realised
expert-FLOP fraction, teacher as the reference point), ``where.json`` (zero share per domain x layer, real experts
per token histogram, token-level view of sample text, and ``uncertainty``: the per-token zero share correlated with
the teacher's entropy and KL(teacher || student) per domain and layer, see ``bench/where.py``; per run),
``frontier.json`` (everything, plus whether ZEDA leads each method at matched realised FLOPs). The last stdout line
is a JSON summary.

    python bench/frontier.py [--quick] [--out runs/frontier/full] [--ratios 0.25 0.5] [--methods zeda top_p]

On 2 cores, two processes of one thread each (``OMP_NUM_THREADS=1``, each ``--methods`` half, its own ``--out``)
finish sooner than one of two threads; ``--merge OUT DIR DIR...`` then writes the combined outputs to OUT.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from zeda_lightning.adapters import adapter_for, inject
from zeda_lightning.analysis import routing_report, token_view, zero_ratio
from zeda_lightning.callbacks import GroupWeightController, ZeroShareBiasController
from zeda_lightning.data.module import ZedaDataModule, load_rows
from zeda_lightning.export import from_pretrained
from zeda_lightning.fsio import atomic_write
from zeda_lightning.losses.router_losses import BeamSparsity
from zeda_lightning.modules import ZedaDistillModule
from zeda_lightning.routing import (
    AdaMoE,
    AdaptiveK,
    Beam,
    LongCatBias,
    MoEPlusPlus,
    NullExperts,
    StaticTopK,
    TopP,
    ZeroExperts,
    capture_routing,
    iter_routers,
)
from zeda_lightning.routing.adaptive_k import even_thresholds
from zeda_lightning.solve import bisect_monotone
from where import interleave_domains, uncertainty_report  # bench/where.py, next to this file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "assets/tiny_teacher")
CORPUS = os.path.join(ROOT, "data/tiny_corpus")
RATIOS = (0.25, 0.375, 0.5, 0.625, 0.75)
METHODS = ("zeda", "null_experts", "top_p", "static_topk", "longcat", "moe_plus_plus", "beam", "adaptive_k")
ALL_METHODS = METHODS + ("adamoe",)


@dataclass(frozen=True)
class Budget:
    """What every method gets: the same data, steps and evaluation."""

    steps: int = 100
    batch_size: int = 16
    max_length: int = 256
    lr: float = 1e-3
    train_file: str = os.path.join(CORPUS, "train.jsonl.gz")
    test_file: str = os.path.join(CORPUS, "test.jsonl.gz")
    test_batches: int | None = None  # None: the whole test split
    longcat_rate: float = 0.02  # bias step per optimiser step (logit units)
    calib_batches: int = 2  # training batches of 4 sequences that calibrate top-p / adaptive-k on the teacher
    calib_iters: int = 10  # bisection steps for top-p's p and adaptive-k's threshold scale
    beam_coef: float = 0.3  # BEAM sparsity coefficient (its sign follows the realised share, see BeamSparsity)
    group_rate: float = 0.03  # GroupWeightController: w *= exp(rate sign(target - share)) per step (ZEDA, MoE++)
    seed: int = 0
    sample_chars: int = 160  # characters of each domain's first test document shown token by token


FULL = Budget()
# --quick trains on the (small) validation split so tokenising the 3 MB train split does not eat the budget
QUICK = Budget(steps=12, batch_size=4, max_length=128, train_file=os.path.join(CORPUS, "val.jsonl.gz"), test_batches=4,
               longcat_rate=0.05)


@dataclass
class Plan:
    """One training run: a method, its nominal target and the knob that aims at it."""

    method: str
    target: float
    knob: str
    routing: Any
    module_kwargs: dict = field(default_factory=dict)
    callbacks: list = field(default_factory=list)


# -- knobs ---------------------------------------------------------------------------------------------------------
def group_w(target: float, num_real: int, num_zero: int) -> float:
    """w putting L_GA's equilibrium share ``w N_Z / (w N_Z + N)`` at ``target``."""
    return target * num_real / ((1.0 - target) * num_zero)


def static_ks(targets, top_k: int) -> list[int]:
    """The K' values bracketing each target's K (1 - r): static top-K' only realises multiples of 1/K."""
    ks = set()
    for r in targets:
        x = top_k * (1.0 - r)
        ks.update(k for k in (math.floor(x + 1e-9), math.ceil(x - 1e-9)) if 1 <= k < top_k)
    return sorted(ks, reverse=True)


@torch.no_grad()
def calibrated_knob(model, batches: list[dict], set_knob, target: float, lo: float, hi: float, iters: int,
                    increasing: bool) -> tuple[float, float]:
    """``(x, share)``: the knob value whose routing on ``model`` skips a ``target`` share of the slots over
    ``batches`` (``set_knob(x)`` sets it on every router; bisection on [lo, hi], the final bracket's midpoint)."""

    def share(x: float) -> float:
        set_knob(x)
        num = den = 0.0
        for b in batches:
            with capture_routing(model) as rec:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            n_tok = int(b["attention_mask"].sum())
            num += zero_ratio(rec, b["attention_mask"]).item() * n_tok
            den += n_tok
        return num / den

    return bisect_monotone(share, target, lo, hi, iters=iters, increasing=increasing, midpoint=True)


def calibrate_top_p(teacher, batches: list[dict], target: float, iters: int = 10) -> float:
    """p whose top-p routing on the teacher skips a ``target`` share of the K slots (bisection on [0.001, 1]; the
    share falls as p grows)."""
    model = inject(teacher, TopP(p=0.5))
    routers = list(iter_routers(model))

    def set_p(p: float) -> None:
        for r in routers:
            r.p = p

    p, _ = calibrated_knob(model, batches, set_p, target, 1e-3, 1.0, iters, increasing=False)
    return round(p, 4)


def calibrate_adaptive_k(teacher, batches: list[dict], target: float, iters: int = 10) -> list[float]:
    """Adaptive-K thresholds (fractions of ln N, evenly spaced, scaled by one factor) whose routing on the teacher
    skips a ``target`` share of the K slots, i.e. a mean k of K (1 - target). The share grows with the scale; at
    scale = number of k levels the lowest threshold is ln N and every token gets k = 1."""
    model = inject(teacher, AdaptiveK())
    routers = list(iter_routers(model))
    levels = len(routers[0].k_values)

    def set_scale(scale: float) -> None:
        for r in routers:
            r.set_thresholds(even_thresholds(scale, levels))

    scale, _ = calibrated_knob(model, batches, set_scale, target, 0.0, float(levels), iters, increasing=True)
    return [round(t, 4) for t in even_thresholds(scale, levels)]


def make_plans(methods, targets, budget: Budget, dims: dict, calib_batches: list[dict]) -> list[Plan]:
    n, k, seed = dims["num_experts"], dims["top_k"], budget.seed
    plans = []
    for method in methods:
        if method == "static_topk":
            plans += [Plan(method, 1.0 - kp / k, f"K'={kp}", StaticTopK(kp), {"aux_loss": "none"})
                      for kp in static_ks(targets, k)]
            continue
        for r in targets:
            if method == "zeda":
                w = group_w(r, n, n // 2)
                plans.append(Plan(method, r, f"w0={w:.3g}", ZeroExperts(seed=seed), {"aux_loss": "group", "group_w": w},
                                  [GroupWeightController(target=r, rate=budget.group_rate)]))
            elif method in ("null_experts", "adamoe"):
                routing = NullExperts(rho=1.0 - r, seed=seed) if method == "null_experts" else AdaMoE(1.0 - r, seed)
                plans.append(Plan(method, r, f"rho={1 - r:.3g}", routing, {"aux_loss": "switch"}))
            elif method == "top_p":
                p = calibrate_top_p(from_pretrained(TEACHER), calib_batches, r, budget.calib_iters)
                plans.append(Plan(method, r, f"p={p}", TopP(p=p), {"aux_loss": "none"}))
            elif method == "longcat":
                plans.append(Plan(method, r, f"target={r}", LongCatBias(target=r, update_rate=budget.longcat_rate,
                                                                        seed=seed), {"aux_loss": "none"},
                                  [ZeroShareBiasController()]))
            elif method == "moe_plus_plus":
                variant = MoEPlusPlus(seed=seed)
                w = group_w(r, n, variant.num_zero_experts)
                plans.append(Plan(method, r, f"w0={w:.3g}", variant, {"aux_loss": "group", "group_w": w},
                                  [GroupWeightController(target=r, rate=budget.group_rate)]))
            elif method == "beam":
                loss = BeamSparsity(coef=budget.beam_coef, target=r)
                plans.append(Plan(method, r, f"target={r}", Beam(), {"aux_loss": loss}))
            elif method == "adaptive_k":
                th = calibrate_adaptive_k(from_pretrained(TEACHER), calib_batches, r, budget.calib_iters)
                plans.append(Plan(method, r, "h=" + "/".join(f"{t:.3g}" for t in th), AdaptiveK(thresholds=th),
                                  {"aux_loss": "none"}))
            else:
                raise ValueError(f"unknown method {method!r}; choose from {ALL_METHODS}")
    # the runs nearest half the expert FLOPs first: a run cut short still has every method at one ratio
    return sorted(plans, key=lambda p: round(abs(p.target - 0.5), 6))


def teacher_dims() -> dict:
    """N and K of the teacher's first MoE block, read through its family adapter."""
    model = from_pretrained(TEACHER)
    adapter = adapter_for(model)
    _, block = adapter.find_blocks(model)[0]
    d = adapter.dims(getattr(block, adapter.router_attr))
    return {"num_experts": d.num_experts, "top_k": d.top_k}


# -- one run -------------------------------------------------------------------------------------------------------
def sample_texts(path: str, chars: int) -> dict[str, str]:
    """The first ``chars`` characters of each domain's first document in ``path``."""
    out: dict[str, str] = {}
    for row in load_rows(path):
        out.setdefault(row.get("domain") or "text", row["text"][:chars])
    return out


def train_and_measure(plan: Plan, dm, budget: Budget, samples: dict[str, str], teacher=None) -> tuple[dict, dict]:
    """Train one plan, measure it on the test split; ``teacher`` (the frozen teacher model) adds the per-token
    uncertainty view (``bench/where.py``) to the run's where.json entry."""
    import lightning as L

    L.seed_everything(budget.seed, verbose=False)
    lr = budget.lr
    module = ZedaDistillModule(
        teacher=TEACHER, routing=plan.routing, objective="forward_kl", trainable="full",
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.1),
        lr_schedule="cosine", warmup_ratio=0.1, **plan.module_kwargs,
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=budget.steps, limit_val_batches=0,
        limit_test_batches=budget.test_batches or 1.0, gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=list(plan.callbacks),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_s = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.test(module, datamodule=dm, verbose=False)[0].items()}
    test_batches = itertools.islice(dm.test_dataloader(), budget.test_batches)
    where = routing_report(module.student, test_batches, dm.domains)
    if teacher is not None:
        test_batches = itertools.islice(dm.test_dataloader(), budget.test_batches)
        where["uncertainty"] = uncertainty_report(module.student, teacher, test_batches, dm.domains)
    tok = dm.tokenizer
    where["token_view"] = {d: token_view(module.student, tok, text) for d, text in samples.items()}
    row = {
        "method": plan.method, "target": plan.target, "knob": plan.knob,
        "nll": metrics["test/nll"], "teacher_nll": metrics["test/teacher_nll"],
        "kl_to_teacher": metrics["test/kl_to_teacher"], "top1_agreement": metrics["test/top1_agreement"],
        "zero_ratio": where["zero_ratio"], "expert_flop_fraction": where["expert_flop_fraction"],
        "real_experts_per_token": metrics["test/real_experts_per_token"],
        **{f"zero_ratio_{d}": metrics.get(f"test/zero_ratio/{d}", float("nan")) for d in dm.domains},
        "train_seconds": round(train_s, 1), "eval_seconds": round(time.perf_counter() - start - train_s, 1),
    }
    return row, where


# -- comparison and outputs ----------------------------------------------------------------------------------------
def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear value at ``x`` through ``(x, y)`` points; None outside their x range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] - 1e-9 or x > pts[-1][0] + 1e-9:
        return None
    if len(pts) == 1:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 - 1e-9 <= x <= x1 + 1e-9:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def compare_at_matched_flops(rows: list[dict], reference: str = "zeda") -> list[dict]:
    """For each ``reference`` run: every other method's NLL (and KL to the teacher, where rows carry it)
    interpolated at the same realised expert-FLOP fraction (None where that method's frontier does not reach it)
    and whether the reference is lower."""
    metrics = [m for m in ("nll", "kl_to_teacher") if all(m in r for r in rows)]
    frontiers: dict[str, dict[str, list[tuple[float, float]]]] = {m: {} for m in metrics}  # metric -> method -> pts
    for o in (o for o in rows if o["method"] != reference):
        for metric in metrics:
            frontiers[metric].setdefault(o["method"], []).append((o["expert_flop_fraction"], o[metric]))
    out = []
    for r in (r for r in rows if r["method"] == reference):
        x = r["expert_flop_fraction"]
        entry = {"target": r["target"], "expert_flop_fraction": round(x, 4)}
        for metric in metrics:
            others = {m: interpolate(pts, x) for m, pts in frontiers[metric].items()}
            suffix = "_nll" if metric == "nll" else "_kl"
            entry[metric] = round(r[metric], 4)
            entry[f"others_{metric}"] = {m: None if v is None else round(v, 4) for m, v in others.items()}
            entry[f"leads{suffix}"] = {m: None if v is None else bool(r[metric] < v) for m, v in others.items()}
        out.append(entry)
    return out


def write_csv(path: str, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue().encode())


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (v if k in ("method", "knob") else float(v)) for k, v in r.items()} for r in rows]


def plot_frontier(rows: list[dict], teacher_nll: float, path: str | None = None):
    """NLL and KL to the teacher vs realised expert-FLOP fraction, one line per method, teacher as a star."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["expert_flop_fraction"], r["nll"], r["kl_to_teacher"]) for r in rows if r["method"] == method)
        xs = [p[0] for p in pts]
        style = dict(marker="o", lw=2.5 if method == "zeda" else 1.2, label=method)
        axes[0].plot(xs, [p[1] for p in pts], **style)
        axes[1].plot(xs, [p[2] for p in pts], **style)
    axes[0].plot([1.0], [teacher_nll], marker="*", ms=14, c="k", ls="", label="teacher")
    axes[0].set(xlabel="realised expert-FLOP fraction", ylabel="held-out NLL (nats/token)", title="quality vs compute")
    # log scale: the close methods differ by factors of KL, which a linear axis squeezes together (teacher: KL 0)
    axes[1].set_yscale("log")
    axes[1].set(xlabel="realised expert-FLOP fraction", ylabel="KL(teacher || student), log scale",
                title="distance to teacher")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
        plt.close(fig)
    return fig


def write_outputs(out: str, rows: list[dict], where: dict, budget: Budget, dims: dict, methods, seconds: float,
                  planned: int) -> dict:
    """Write (or refresh, after each run) the CSV, the plot, where.json and frontier.json; return the summary."""
    teacher_nll = rows[0]["teacher_nll"]
    summary = {
        "bench": "frontier", "budget": asdict(budget), "dims": dims, "teacher_nll": round(teacher_nll, 4),
        "runs_done": len(rows), "runs_planned": planned, "rows": rows,
        "matched_flops": compare_at_matched_flops(rows) if "zeda" in methods else [], "seconds": round(seconds, 1),
    }
    write_csv(os.path.join(out, "frontier.csv"), rows)
    plot_frontier(rows, teacher_nll, os.path.join(out, "frontier.png"))
    for name, payload in (("where.json", json.dumps(where)), ("frontier.json", json.dumps(summary, indent=1))):
        with atomic_write(os.path.join(out, name)) as f:
            f.write(payload)
    return summary


def run(budget: Budget, methods=METHODS, ratios=RATIOS, out: str = "runs/frontier/full", log=print) -> dict:
    """Train and measure every (method, ratio), write the outputs under ``out``, return the summary."""
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        raise ValueError(f"unknown methods {bad or methods}; choose from {ALL_METHODS}")
    bad = [r for r in ratios if not 0.0 < r < 1.0]
    if bad or not ratios:
        raise ValueError(f"ratios must lie in (0, 1), got {list(ratios)}")
    for path in (budget.train_file, budget.test_file, os.path.join(TEACHER, "config.json")):
        if not os.path.isfile(path):
            raise ValueError(f"missing {path}: run from a checkout with the shipped assets and data")
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    dims = teacher_dims()
    dm = ZedaDataModule(tokenizer=TEACHER, train_files=budget.train_file, test_files=budget.test_file,
                        max_length=budget.max_length, packing=True, batch_size=budget.batch_size, seed=budget.seed)
    dm.setup("fit")
    dm.datasets["test"] = interleave_domains(dm.datasets["test"])
    log(f"data ready ({time.perf_counter() - started:.0f}s): {len(dm.datasets['train'])} train, "
        f"{len(dm.datasets['test'])} test sequences of {budget.max_length}")
    calib = [dm.collate(dm.datasets["train"][i : i + 4]) for i in range(0, 4 * budget.calib_batches, 4)]
    samples = sample_texts(budget.test_file, budget.sample_chars)
    plans = make_plans(methods, ratios, budget, dims, calib)
    log(f"{len(plans)} runs planned ({time.perf_counter() - started:.0f}s): " + ", ".join(f"{p.method} {p.knob}" for p in plans))
    rows, where = [], {}
    teacher = from_pretrained(TEACHER).eval()
    for i, plan in enumerate(plans):
        row, report = train_and_measure(plan, dm, budget, samples, teacher)
        rows.append(row)
        where[f"{plan.method}@{plan.knob}"] = {"method": plan.method, "target": plan.target, **report}
        log(f"[{i + 1}/{len(plans)}] {plan.method:>13} {plan.knob:>12}: nll {row['nll']:.4f} kl {row['kl_to_teacher']:.4f}"
            f" agree {row['top1_agreement']:.3f} zero {row['zero_ratio']:.3f} ({row['train_seconds']}s train)")
        summary = write_outputs(out, rows, where, budget, dims, methods, time.perf_counter() - started, len(plans))
    return summary


def merge(out: str, parts: list[str]) -> dict:
    """One set of outputs under ``out`` from runs of the same budget written to ``parts`` (each a ``--out``)."""
    summaries, where = [], {}
    for part in parts:
        with open(os.path.join(part, "frontier.json")) as f:
            summaries.append(json.load(f))
        with open(os.path.join(part, "where.json")) as f:
            where.update(json.load(f))
    first = summaries[0]
    if any(s["budget"] != first["budget"] or s["dims"] != first["dims"] for s in summaries):
        raise ValueError(f"--merge: {parts} were run with different budgets or teachers; merge runs of one budget")
    rows = [r for s in summaries for r in s["rows"]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    os.makedirs(out, exist_ok=True)
    summary = write_outputs(out, rows, where, Budget(**first["budget"]), first["dims"], methods,
                            max(s["seconds"] for s in summaries), sum(s["runs_planned"] for s in summaries))
    summary["seconds_per_part"] = [s["seconds"] for s in summaries]
    with atomic_write(os.path.join(out, "frontier.json")) as f:
        f.write(json.dumps(summary, indent=1))
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smoke budget: {QUICK.steps} steps, ratio 0.5 only (~3 min)")
    p.add_argument("--out", default=None, help="output folder (default runs/frontier/{full,quick})")
    p.add_argument("--ratios", type=float, nargs="+", default=None, help=f"target zero ratios (default {RATIOS})")
    p.add_argument("--methods", nargs="+", default=None, help=f"methods (default {METHODS}; also: adamoe)")
    p.add_argument("--steps", type=int, default=None, help=f"optimiser steps per run (default {FULL.steps})")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                   help="write the outputs of these finished --out folders, combined, to --out (no training)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    budget = QUICK if args.quick else FULL
    if args.steps is not None:
        budget = replace(budget, steps=args.steps)
    ratios = tuple(args.ratios or ((0.5,) if args.quick else RATIOS))
    out = args.out or os.path.join("runs/frontier", "quick" if args.quick else "full")
    if args.merge:
        summary = merge(out, args.merge)
        print(json.dumps({k: summary[k] for k in ("bench", "teacher_nll", "matched_flops", "seconds", "runs_done")}))
        return summary
    summary = run(budget, tuple(args.methods or METHODS), ratios, out, log=lambda s: print(s, file=sys.stderr))
    print(f"\n{'method':>13} {'knob':>12} {'FLOP frac':>9} {'NLL':>7} {'KL':>7} {'agree':>6}   teacher NLL "
          f"{summary['teacher_nll']:.4f}")
    for r in sorted(summary["rows"], key=lambda r: (r["method"], -r["expert_flop_fraction"])):
        print(f"{r['method']:>13} {r['knob']:>12} {r['expert_flop_fraction']:9.3f} {r['nll']:7.4f} "
              f"{r['kl_to_teacher']:7.4f} {r['top1_agreement']:6.3f}")
    final = {k: summary[k] for k in ("bench", "teacher_nll", "matched_flops", "seconds")}
    final["points"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                        if k in ("method", "knob", "expert_flop_fraction", "nll", "kl_to_teacher", "top1_agreement")}
                       for r in summary["rows"]]
    final["out"] = out
    print(json.dumps(final))
    return summary


if __name__ == "__main__":
    main()
