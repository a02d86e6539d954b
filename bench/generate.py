"""Prefill and decode tokens/s of the distilled tiny student against its teacher, side by side in one run.

What it measures
    ``runs/tiny/student`` (stage-1 ZEDA export: 16 real + 8 zero experts, top-4) and ``assets/tiny_teacher`` (the
    same model before distillation) on held-out text (``data/tiny_corpus/test``), fp32, ``torch.no_grad``, the
    experts implementation of the checkpoint (``grouped_mm``), skipped slots dropped by the sentinel hooks.

    * prefill: one forward over ``(B, S)`` prompt tokens with a fresh KV cache and logits for the last position
      only (``logits_to_keep=1``, as ``generate`` does);
    * decode: ``--decode`` steps of one token per sequence on a KV cache prefilled with the prompt (cropped back to
      the prompt before each run), fed the real next tokens of the text so both models do identical work.

    at batch 1 and 16, for a short and a long prompt (``--prompt-lens``): the tiny model is so small that Python
    and framework overhead dominate short calls, and the expert GEMMs matter only with more tokens per call.
    ``--budgets`` adds the student recalibrated to other zero ratios (``zeda_lightning.budget``, per layer, on the
    validation split) as further variants.

How it is timed
    ``bench/_timing.py``: per configuration, rounds of ``teacher, student, teacher, student@b, ..., teacher`` in a
    fresh random order; each variant run is divided by the mean of the teacher runs around it; medians over
    ``--reps`` rounds after ``--warmup``. speedup = 1 / that ratio; tokens/s = tokens / median seconds.

    python bench/generate.py --quick     # about a minute on 2 idle cores
    python bench/generate.py             # a few minutes

Output: a table and ONE final JSON line (target: prefill speedup >= 1.25x).
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import torch
from transformers import AutoTokenizer, DynamicCache

from _timing import time_paired  # bench/ is on sys.path when a bench runs as a script
from moe_block import resolve_threads
from zeda_lightning.analysis import zero_ratio
from zeda_lightning.budget import calibrate_zero_bias, text_blocks
from zeda_lightning.export import from_pretrained
from zeda_lightning.routing import capture_routing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="runs/tiny/student")
    p.add_argument("--teacher", default="assets/tiny_teacher")
    p.add_argument("--heldout", default="data/tiny_corpus/test.jsonl.gz")
    p.add_argument("--calibration", default="data/tiny_corpus/val.jsonl.gz", help="for --budgets")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-lens", default="32,256", help="short and long prompts (tokens)")
    p.add_argument("--decode", type=int, default=32, help="decode steps per run")
    p.add_argument("--budgets", default="0.7", help="extra student variants at these zero ratios ('' for none)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", default="auto", help="an integer, or 'auto' (1 thread when other work is running)")
    p.add_argument("--quick", action="store_true", help="3 reps, 16 decode steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.decode = 3, 16
    return args


class Prefill:
    def __init__(self, model, ids: torch.Tensor) -> None:
        self.model, self.ids = model, ids

    def __call__(self) -> None:
        with torch.no_grad():
            self.model(self.ids, past_key_values=DynamicCache(config=self.model.config), use_cache=True,
                       logits_to_keep=1)


class Decode:
    """``steps`` one-token forwards on a cache holding the prompt; the cache is cropped back before each run."""

    def __init__(self, model, prompt: torch.Tensor, next_tokens: torch.Tensor) -> None:
        self.model, self.next_tokens, self.prompt_len = model, next_tokens, prompt.shape[1]
        self.cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(prompt, past_key_values=self.cache, use_cache=True, logits_to_keep=1)

    def __call__(self) -> None:
        extra = self.cache.get_seq_length() - self.prompt_len
        if extra:
            self.cache.crop(-extra)  # back to the prompt
        with torch.no_grad():
            for t in range(self.next_tokens.shape[1]):
                self.model(self.next_tokens[:, t : t + 1], past_key_values=self.cache, use_cache=True)


def zero_ratio_of(model, run) -> float | None:
    with capture_routing(model, accumulate=True) as rec:
        run()
    outs = [o for layer in rec.values() for o in layer]  # every forward of the run routes the same T tokens
    return zero_ratio(outs).item() if outs else None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads, reason = resolve_threads(args.threads)
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(args.student)
    teacher, student = from_pretrained(args.teacher), from_pretrained(args.student)
    models = {"student": student}
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    for b in budgets:
        m = from_pretrained(args.student)
        calibrate_zero_bias(m, text_blocks(args.calibration, tok, 256, 16), b)
        models[f"student@{b:g}"] = m
    batches = [int(b) for b in args.batches.split(",")]
    lens = [int(s) for s in args.prompt_lens.split(",")]
    need = max(lens) + args.decode
    text = text_blocks(args.heldout, tok, need, max(batches))  # (max B, S + decode) real held-out tokens
    print(f"torch {torch.__version__}, threads {threads} ({reason}); teacher {args.teacher}, student {args.student}"
          f"{', budgets ' + str(budgets) if budgets else ''}; reps {args.reps}", file=sys.stderr)
    rng = random.Random(args.seed)
    rows = []
    for phase in ("prefill", "decode"):
        for batch in batches:
            for s in lens:
                prompt = text[:batch, :s]
                nxt = text[:batch, s : s + args.decode]
                make = (lambda m: Prefill(m, prompt)) if phase == "prefill" else (lambda m: Decode(m, prompt, nxt))
                base = make(teacher)
                runs = {name: make(m) for name, m in models.items()}
                timing = time_paired(base, runs, args.reps, args.warmup, rng)
                tokens = batch * (s if phase == "prefill" else args.decode)
                row = {"phase": phase, "batch": batch, "prompt_len": s, "tokens": tokens,
                       "teacher_tok_s": round(tokens / timing.baseline_s, 1)}
                for name in models:
                    row[f"{name}_tok_s"] = round(tokens / timing.seconds[name], 1)
                    row[f"{name}_speedup"] = round(1 / timing.ratio[name], 3)
                    row[f"{name}_zero_ratio"] = round(zero_ratio_of(models[name], runs[name]), 3)
                rows.append(row)
                cells = "  ".join(f"{n} {row[f'{n}_tok_s']:>9.1f} tok/s {row[f'{n}_speedup']:.2f}x "
                                  f"(zero {row[f'{n}_zero_ratio']:.2f})" for n in models)
                print(f"{phase:7s} B={batch:<3d} S={s:<4d} teacher {row['teacher_tok_s']:>9.1f} tok/s  {cells}",
                      file=sys.stderr)
    prefill = [r for r in rows if r["phase"] == "prefill"]
    best = max(prefill, key=lambda r: r["student_speedup"])
    result = {
        "bench": "generate",
        "threads": threads,
        "threads_reason": reason,
        "reps": args.reps,
        "decode_steps": args.decode,
        "rows": rows,
        "prefill_speedup_min": min(r["student_speedup"] for r in prefill),
        "prefill_speedup_max": best["student_speedup"],
        "prefill_speedup_max_at": {"batch": best["batch"], "prompt_len": best["prompt_len"]},
        "target_prefill_1_25x_met": best["student_speedup"] >= 1.25,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
