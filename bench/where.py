"""Where compute goes, by uncertainty: per token, a student's zero (skipped-slot) share against the teacher's
next-token entropy and against KL(teacher || student), correlated per domain and per layer.

The ZEDA paper (arXiv 2605.18643) reports that compute tracks uncertainty and teacher-student disagreement more than
task difficulty; this measures it on any injected student. For each valid position t of the test batches:

    z_{l,t}    skipped slots / K at MoE layer l (the routing at t sets the compute spent on predicting t + 1)
    H_t        entropy (nats) of the teacher's next-token distribution at t
    KL_t       KL(teacher || student) of the next-token distributions at t (the prediction this compute serves;
               partly caused by the skipping at t itself, hence also:)
    KL_{t-1}   the same one step before: how far the student was on the token t it is now reading (undefined at a
               sequence's first position, which is left out of that correlation)

For every domain and for all tokens: Pearson and Spearman (average ranks for ties: z takes few values)
correlations of z (each layer, and the mean over layers) with each signal, and the mean z by teacher-entropy
quintile. ``frontier.py`` adds this to each run's ``where.json`` entry; run alone it writes ``where.json``:

    python bench/where.py --student DIR [--teacher assets/tiny_teacher] [--out runs/where] [--batches 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
from torch import Tensor

from zeda_lightning.analysis import stacked_skips
from zeda_lightning.data.module import ZedaDataModule
from zeda_lightning.export import from_pretrained
from zeda_lightning.fsio import atomic_write
from zeda_lightning.losses.kd import token_kl
from zeda_lightning.routing import capture_routing, iter_routers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGNALS = ("teacher_entropy", "kl", "kl_prev")
QUANTILES = 5


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of ``x`` (n,), ties sharing their average rank (what Spearman's rho needs)."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)  # unique values ascending
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def pearson(x: Tensor, y: Tensor) -> float | None:
    """Pearson's r of two (n,) tensors; None when either is constant or n < 3."""
    x, y = x.double(), y.double()
    if x.numel() < 3:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    den = (dx.square().sum() * dy.square().sum()).sqrt()
    return None if den == 0 else float((dx * dy).sum() / den)


def spearman(x: Tensor, y: Tensor) -> float | None:
    return pearson(average_ranks(x), average_ranks(y))


@torch.no_grad()
def token_signals(student, teacher, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """One batch's per-position values over its valid positions: ``zero`` (L, T'), ``teacher_entropy``, ``kl``,
    ``kl_prev`` (T',; NaN at a sequence's first position) and ``domain`` (T',; -1 when the batch has none)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with capture_routing(student) as records:
        s_logits = student(input_ids=ids, attention_mask=mask).logits  # (B, S, V)
    t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    log_t, log_s = torch.log_softmax(t_logits.float(), -1), torch.log_softmax(s_logits.float(), -1)
    entropy = -(log_t.exp() * log_t).nan_to_num().sum(-1)  # (B, S); 0 log 0 = 0
    kl = token_kl(log_t, log_s)  # (B, S)
    kl_prev = torch.cat([kl.new_full((kl.shape[0], 1), float("nan")), kl[:, :-1]], dim=1)  # (B, S)
    kl_prev = kl_prev.masked_fill(torch.cat([mask.new_zeros(mask.shape[0], 1), mask[:, :-1]], 1) == 0, float("nan"))
    zero = stacked_skips(records).float().mean(-1)  # (L, B*S)
    valid = mask.reshape(-1).bool()
    domain = batch.get("domain", torch.full((ids.shape[0],), -1))[:, None].expand_as(ids).reshape(-1)
    return {"zero": zero[:, valid], "teacher_entropy": entropy.reshape(-1)[valid], "kl": kl.reshape(-1)[valid],
            "kl_prev": kl_prev.reshape(-1)[valid], "domain": domain[valid]}


def _correlations(zero: Tensor, signals: dict[str, Tensor], layers: list[int]) -> dict:
    """Correlations of each layer's (and the layer-mean) zero share with each signal, over one group of tokens."""
    out = {"tokens": int(zero.shape[1]), "zero_ratio": round(float(zero.mean()), 4) if zero.numel() else None}
    series = {"mean": zero.mean(0), **{str(layer): zero[i] for i, layer in enumerate(layers)}}
    for name in SIGNALS:
        x = signals[name]
        ok = ~torch.isnan(x)
        out[name] = {key: {"pearson": _round(pearson(z[ok], x[ok])), "spearman": _round(spearman(z[ok], x[ok]))}
                     for key, z in series.items()}
    h, z = signals["teacher_entropy"], zero.mean(0)
    if h.numel() >= QUANTILES:
        edges = h.quantile(torch.linspace(0, 1, QUANTILES + 1, dtype=h.dtype))
        bins = torch.bucketize(h, edges[1:-1], right=True)  # (T,) 0..QUANTILES-1
        out["zero_by_entropy_quintile"] = [_round(float(z[bins == q].mean())) if (bins == q).any() else None
                                           for q in range(QUANTILES)]
        out["entropy_quintile_edges"] = [round(float(e), 4) for e in edges]
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def uncertainty_report(student, teacher, batches, domains: list[str]) -> dict:
    """Correlations of the student's per-token zero share with the teacher's entropy and with KL(teacher ||
    student) (same position and one step before), for all tokens and per domain, per layer and layer-mean."""
    was_training = student.training
    student.eval()
    parts: list[dict[str, Tensor]] = []
    try:
        for batch in batches:
            parts.append(token_signals(student, teacher, batch))
    finally:
        student.train(was_training)
    if not parts:
        raise ValueError("uncertainty_report: no batch given")
    layers = sorted(r.layer_idx for r in iter_routers(student))  # the order stacked_skips stacks them in
    cat = {k: torch.cat([p[k] for p in parts], dim=-1) for k in parts[0]}
    zero, dom = cat.pop("zero"), cat.pop("domain")
    report = {"layers": layers, "all": _correlations(zero, cat, layers), "domains": {}}
    for i, name in enumerate(domains):
        sel = dom == i
        if sel.any():
            report["domains"][name] = _correlations(zero[:, sel], {k: v[sel] for k, v in cat.items()}, layers)
    return report


def interleave_domains(blocks: list[dict]) -> list[dict]:
    """Packed blocks come grouped by domain; round-robin them so a limited evaluation (``test_batches``) still sees
    every domain. The whole split's metrics do not depend on the order."""
    by_domain: dict[int, list[dict]] = {}
    for b in blocks:
        by_domain.setdefault(b["domain"], []).append(b)
    rounds = itertools.zip_longest(*by_domain.values())
    return [b for group in rounds for b in group if b is not None]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="an exported zeda student (zeda_lightning.export)")
    p.add_argument("--teacher", default=os.path.join(ROOT, "assets/tiny_teacher"), help="the teacher it follows")
    p.add_argument("--test_file", default=os.path.join(ROOT, "data/tiny_corpus/test.jsonl.gz"))
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--batches", type=int, default=8, help="test batches of 8 sequences (default 8)")
    p.add_argument("--out", default="runs/where", help="output folder for where.json")
    args = p.parse_args(argv)
    student, teacher = from_pretrained(args.student).eval(), from_pretrained(args.teacher).eval()
    dm = ZedaDataModule(tokenizer=args.teacher, train_files=args.test_file, test_files=args.test_file,
                        max_length=args.max_length, packing=True, batch_size=8)
    dm.setup("fit")
    dm.datasets["test"] = interleave_domains(dm.datasets["test"])
    batches = list(itertools.islice(dm.test_dataloader(), args.batches))
    report = uncertainty_report(student, teacher, batches, dm.domains)
    os.makedirs(args.out, exist_ok=True)
    with atomic_write(os.path.join(args.out, "where.json")) as f:
        f.write(json.dumps(report, indent=1))
    print(json.dumps({"out": args.out, "all": {k: report["all"][k]["mean"] for k in SIGNALS}}), file=sys.stdout)
    return report


if __name__ == "__main__":
    main()
