"""The paper's two-stage recipe on the tiny teacher, beside the stage-1 objectives alone and forward KL + OPD.

Four recipes, every one at the same target zero share (L_GA, alpha 0.1, the same ``group_w``), so they are compared
at matched expert FLOPs (the realised zero shares are reported):

    sft          stage 1 of the paper: responses sampled from the frozen teacher with ``generate`` (prompts cut from
                 the train split), cross-entropy on the response tokens (``objective: sft``) + L_GA
    sft+opd      the paper's recipe: that student, then stage 2 (``OnPolicyDistillModule``: the student samples, the
                 teacher scores; exact per-token reverse KL on the student's samples, or PPO-clip, + L_GA)
    fkl          ``configs/tiny.yaml``'s stage 1: forward KL to the teacher's full logits on corpus text + L_GA
    fkl+opd      that student, then the same stage 2

Each final student is measured the same way: on the held-out test split (packed text) NLL, KL(teacher || student),
top-1 agreement and the realised zero share (``trainer.test`` of a ``ZedaDistillModule`` built on the export); the
exact reverse KL to the teacher on the student's own samples for held-out test prompts
(``OnPolicyDistillModule.heldout_reverse_kl``, fixed seeds) and the zero share of those forwards; and the lm-eval
local task ``zeda_tiny_continuation`` (``tests/evaluation/tasks``; accuracy, chance 0.25). The teacher is measured
too, as the reference. Several stage-1 / stage-2 learning rates may be given: every setting tried is a row.

    python bench/recipes.py [--quick] [--out DIR] [--sft-lrs 1e-3 3e-4] [--opd-lrs 1e-4 3e-5] [--json FILE]

The table goes to stdout and the last stdout line is one JSON object (settings, rows, the stage-2 deltas).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch

from frontier import CORPUS, ROOT, TEACHER, group_w, teacher_dims, write_csv  # bench/frontier.py, next to this file
from where import interleave_domains  # bench/where.py
from zeda_lightning.data.module import ZedaDataModule, load_rows
from zeda_lightning.fsio import atomic_write
from zeda_lightning.generate import generate_responses
from zeda_lightning.modules import OnPolicyDistillModule, ZedaDistillModule
from zeda_lightning.routing import ZeroExperts

TASKS = os.path.join(ROOT, "tests/evaluation/tasks")
TASK = "zeda_tiny_continuation"


@dataclass(frozen=True)
class Settings:
    """Everything a recipe run depends on (written with the results)."""

    target: float = 0.5  # zero share L_GA aims at: w = r N / ((1 - r) N_Z) (0.5 -> the paper's w = 2)
    group_alpha: float = 0.1
    seed: int = 0
    # stage 1, both objectives: the same optimiser, schedule, steps and sequences per step
    stage1_steps: int = 200
    batch_size: int = 16
    kl_lr: float = 1e-3  # forward KL (configs/tiny.yaml's lr)
    sft_lr: float = 1e-3  # cross-entropy on the teacher's samples
    kl_max_length: int = 256  # packed corpus blocks
    kl_train_file: str = os.path.join(CORPUS, "train.jsonl.gz")
    # stage-1 data sampled from the teacher
    gen_prompt_file: str = os.path.join(CORPUS, "train.jsonl.gz")
    gen_prompts: int = 1536  # prompts cut from train documents (windows of prompt_tokens at gen_stride offsets)
    gen_stride: int = 192  # token offset between prompts taken from one document
    gen_samples: int = 2  # teacher responses per prompt
    gen_new_tokens: int = 96
    gen_temperature: float = 1.0
    prompt_tokens: int = 32
    sft_max_length: int = 160  # prompt + response tokens per SFT row (no packing)
    # stage 2 (configs/tiny_opd.yaml's settings unless tuned)
    opd_steps: int = 60
    opd_prompts: int = 16  # prompts per step
    opd_samples: int = 2  # samples per prompt
    opd_new_tokens: int = 48
    opd_train_file: str = os.path.join(CORPUS, "train.jsonl.gz")
    exact_reverse_kl: bool = True  # False: the paper's PPO-clip on A_t = log pi_T - log pi_S_old
    # evaluation
    test_file: str = os.path.join(CORPUS, "test.jsonl.gz")
    test_batches: int | None = None  # None: the whole test split (packed blocks of kl_max_length)
    rkl_prompts: int = 128  # held-out test prompts for the reverse KL on the student's samples
    rkl_samples: int = 2
    rkl_new_tokens: int = 48
    lmeval_limit: int | None = None  # None: all 90 documents of the local task
    lmeval: bool = True


FULL = Settings()
# --quick: a few steps each; forward KL trains on the small validation split (tokenising the 3 MB train split would
# eat the budget), the stage-1 prompts still come from the train split (only the first rows are read)
QUICK = Settings(stage1_steps=6, batch_size=4, kl_max_length=128, kl_train_file=os.path.join(CORPUS, "val.jsonl.gz"),
                 gen_prompts=16, gen_samples=2, gen_new_tokens=24, sft_max_length=64, opd_steps=3, opd_prompts=4,
                 opd_new_tokens=16, opd_train_file=os.path.join(CORPUS, "val.jsonl.gz"), test_batches=2,
                 rkl_prompts=8, rkl_new_tokens=16, lmeval_limit=8)


def adamw(lr: float, weight_decay: float):
    return lambda params: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)


def trainer(steps: int | None = None, test_batches: int | None = None):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps or -1, limit_val_batches=0,
                     limit_test_batches=test_batches or 1.0, gradient_clip_val=1.0, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


# -- stage-1 data ----------------------------------------------------------------------------------------------------
def write_prompts(s: Settings, path: str) -> int:
    """Prompt rows of ``prompt_tokens`` tokens cut from train documents (every ``gen_stride`` tokens; documents in a
    seeded shuffle, so every domain is represented), ``gen_prompts`` of them; returns the count."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TEACHER)
    rows = list(load_rows(s.gen_prompt_file))
    random.Random(s.seed).shuffle(rows)
    out = []
    for row in rows:
        ids = tok(row["text"], add_special_tokens=False)["input_ids"]
        for o in range(0, max(1, len(ids) - s.prompt_tokens - 16), s.gen_stride):
            text = tok.decode(ids[o : o + s.prompt_tokens])
            if text.strip():
                out.append({"prompt": text, **({"domain": row["domain"]} if row.get("domain") else {})})
        if len(out) >= s.gen_prompts:
            break
    out = out[: s.gen_prompts]
    with atomic_write(path) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    return len(out)


def sample_stage1_data(s: Settings, tmp: str, log) -> tuple[str, dict]:
    """The teacher's responses to train prompts (``python -m zeda_lightning generate``'s function)."""
    prompts, out = os.path.join(tmp, "prompts.jsonl"), os.path.join(tmp, "stage1.jsonl")
    n = write_prompts(s, prompts)
    start = time.perf_counter()
    info = generate_responses(TEACHER, prompts=prompts, out=out, max_new_tokens=s.gen_new_tokens,
                              temperature=s.gen_temperature, num_samples=s.gen_samples, batch_size=32, seed=s.seed)
    seconds = time.perf_counter() - start
    # a response the teacher ended at once (EOS first) has nothing to train on: the data module refuses empty ones
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    kept = [r for r in rows if r["response"].strip()]
    train = os.path.join(tmp, "stage1_train.jsonl")
    with atomic_write(train) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    stats = {"prompts": n, "rows": info["rows"], "empty_dropped": len(rows) - len(kept),
             "new_tokens": info["new_tokens"],
             "mean_response_tokens": round(info["new_tokens"] / max(1, info["rows"]), 1), "seconds": round(seconds, 1)}
    log(f"stage-1 data: {stats}")
    return train, stats


# -- training --------------------------------------------------------------------------------------------------------
def routing(s: Settings) -> ZeroExperts:
    return ZeroExperts(seed=s.seed)


def fit(module, dm, steps: int, seed: int) -> float:
    import lightning as L

    L.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    trainer(steps).fit(module, datamodule=dm)
    return time.perf_counter() - start


def stage1(s: Settings, objective: str, lr: float, w: float, export: str, stage1_file: str | None) -> float:
    """Stage 1 from the teacher: ``sft`` on the teacher's samples or ``forward_kl`` on corpus text, + L_GA."""
    if objective == "sft":
        dm = ZedaDataModule(tokenizer=TEACHER, train_files=stage1_file, max_length=s.sft_max_length, packing=False,
                            batch_size=s.batch_size, seed=s.seed, add_eos=False)
    else:
        dm = ZedaDataModule(tokenizer=TEACHER, train_files=s.kl_train_file, max_length=s.kl_max_length, packing=True,
                            batch_size=s.batch_size, seed=s.seed)
    module = ZedaDistillModule(teacher=TEACHER, routing=routing(s), objective=objective, aux_loss="group",
                               group_alpha=s.group_alpha, group_w=w, trainable="full", optimizer=adamw(lr, 0.1),
                               lr_schedule="cosine", warmup_ratio=0.1, export_dir=export)
    return fit(module, dm, s.stage1_steps, s.seed)


def opd_module(s: Settings, student: str, w: float, lr: float = 1e-4, export: str | None = None,
               num_samples: int | None = None, new_tokens: int | None = None) -> OnPolicyDistillModule:
    return OnPolicyDistillModule(
        teacher=TEACHER, student=student, routing=routing(s), num_samples=num_samples or s.opd_samples,
        max_new_tokens=new_tokens or s.opd_new_tokens, sampling_temperature=1.0, clip_eps=0.2, clip_eps_high=0.28,
        routing_replay=True, exact_reverse_kl=s.exact_reverse_kl, aux_loss="group", group_alpha=s.group_alpha,
        group_w=w, optimizer=adamw(lr, 0.0), lr_schedule="constant", warmup_ratio=0.0, export_dir=export,
        seed=s.seed)


def stage2(s: Settings, student: str, lr: float, w: float, export: str) -> float:
    dm = ZedaDataModule(tokenizer=TEACHER, train_files=s.opd_train_file, prompts=True, prompt_tokens=s.prompt_tokens,
                        max_length=s.prompt_tokens * 2, batch_size=s.opd_prompts, seed=s.seed)
    return fit(opd_module(s, student, w, lr, export), dm, s.opd_steps, s.seed)


# -- measurement -----------------------------------------------------------------------------------------------------
class Evaluator:
    """The same held-out measurements for every model directory (the teacher included)."""

    def __init__(self, s: Settings, w: float):
        self.s, self.w = s, w
        self.text = ZedaDataModule(tokenizer=TEACHER, test_files=s.test_file, max_length=s.kl_max_length,
                                   packing=True, batch_size=s.batch_size, seed=s.seed)
        self.text.setup("test")
        self.text.datasets["test"] = interleave_domains(self.text.datasets["test"])
        self.prompts = ZedaDataModule(tokenizer=TEACHER, test_files=s.test_file, prompts=True,
                                      prompt_tokens=s.prompt_tokens, max_length=s.prompt_tokens * 2, batch_size=16,
                                      seed=s.seed)
        self.prompts.setup("test")
        rows = list(self.prompts.datasets["test"])
        random.Random(s.seed).shuffle(rows)  # every domain among the first rkl_prompts
        self.prompt_rows = rows[: s.rkl_prompts]

    def __call__(self, model_dir: str, is_teacher: bool = False) -> dict:
        s, start = self.s, time.perf_counter()
        student = None if is_teacher else model_dir
        module = ZedaDistillModule(teacher=TEACHER, student=student, routing=routing(s), objective="forward_kl",
                                   aux_loss="group", group_w=self.w)
        if is_teacher:  # the teacher with zero experts masked: exactly the original (zeda.md 1, 3b)
            from zeda_lightning.adapters import set_zero_mask

            module.configure_model()
            set_zero_mask(module.student, True)
        m = {k: float(v) for k, v in trainer(test_batches=s.test_batches).test(module, datamodule=self.text,
                                                                             verbose=False)[0].items()}
        row = {"nll": m["test/nll"], "teacher_nll": m["test/teacher_nll"], "kl_to_teacher": m["test/kl_to_teacher"],
               "top1_agreement": m["test/top1_agreement"], "zero_ratio": m.get("test/zero_ratio", 0.0)}
        row.update({f"zero_ratio_{d}": m.get(f"test/zero_ratio/{d}", 0.0) for d in self.text.domains})
        if is_teacher:
            row.update(reverse_kl=0.0, sampled_zero_ratio=0.0)
        else:
            opd = opd_module(s, model_dir, self.w, num_samples=s.rkl_samples, new_tokens=s.rkl_new_tokens)
            opd.configure_model()
            kls, zeros, weights = [], [], []
            for i in range(0, len(self.prompt_rows), 16):
                batch = self.prompts.collate(self.prompt_rows[i : i + 16])
                kl, zero = opd.heldout_reverse_kl(batch, seed=1234 + i // 16)
                kls.append(float(kl)), zeros.append(float(zero)), weights.append(batch["prompt_ids"].shape[0])
            total = sum(weights)
            row["reverse_kl"] = sum(k * n for k, n in zip(kls, weights)) / total
            row["sampled_zero_ratio"] = sum(z * n for z, n in zip(zeros, weights)) / total
        if s.lmeval:
            from zeda_lightning.evaluation.harness import evaluate

            res = evaluate(model_dir, [TASK], include_path=TASKS, limit=s.lmeval_limit, batch_size=16, seed=s.seed)
            task = res["results"][TASK]
            row["lmeval_acc"] = float(task["acc,none"])
            row["lmeval_acc_norm"] = float(task.get("acc_norm,none", float("nan")))
        row["eval_seconds"] = round(time.perf_counter() - start, 1)
        return row


# -- the run ---------------------------------------------------------------------------------------------------------
METRICS = ("nll", "kl_to_teacher", "reverse_kl", "top1_agreement", "lmeval_acc")


def stage2_deltas(rows: list[dict]) -> list[dict]:
    """Each OPD row against the stage-1 row it started from: metric differences (negative NLL / KL = stage 2 helps)."""
    by_name = {r["name"]: r for r in rows}
    out = []
    for r in rows:
        base = by_name.get(r.get("from"))
        if base is None:
            continue
        d = {"name": r["name"], "from": base["name"]}
        for k in METRICS + ("zero_ratio",):
            if k in r and k in base:
                d[k] = round(r[k] - base[k], 4)
        out.append(d)
    return out


def clean(x):
    """Non-finite floats as None, so the JSON is strict."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def write_results(path: str, summary: dict) -> None:
    with atomic_write(path) as f:
        json.dump(clean(summary), f, indent=1, allow_nan=False)


def run(s: Settings, sft_lrs, kl_lrs, opd_lrs, work: str, log=print, json_path: str | None = None) -> dict:
    for path in (s.kl_train_file, s.gen_prompt_file, s.opd_train_file, s.test_file,
                 os.path.join(TEACHER, "config.json")):
        if not os.path.isfile(path):
            raise ValueError(f"missing {path}: run from a checkout with the shipped assets and data")
    started = time.perf_counter()
    dims = teacher_dims()
    w = group_w(s.target, dims["num_experts"], dims["num_experts"] // 2)
    evaluator = Evaluator(s, w)
    rows = [{"name": "teacher", "recipe": "teacher", "stage1": None, "stage1_lr": None, "opd_lr": None,
             **evaluator(TEACHER, is_teacher=True)}]
    log(f"teacher: {fmt(rows[0])}")
    data_file, data_stats = sample_stage1_data(s, work, log) if sft_lrs else (None, None)

    def summary() -> dict:
        return {"bench": "recipes", "settings": asdict(s), "dims": dims, "group_w": round(w, 4),
                "stage1_data": data_stats, "sft_lrs": list(sft_lrs), "kl_lrs": list(kl_lrs),
                "opd_lrs": list(opd_lrs), "rows": rows, "stage2_deltas": stage2_deltas(rows),
                "seconds": round(time.perf_counter() - started, 1)}

    def save() -> None:
        if json_path:
            write_results(json_path, summary())

    def opd(objective: str, short: str, lr: float, name: str, export: str, olr: float) -> None:
        oname = f"{name}+opd@{olr:g}"
        oexport = os.path.join(work, oname)
        osecs = stage2(s, export, olr, w, oexport)
        orow = {"name": oname, "recipe": f"{short}+opd", "from": name, "stage1": objective, "stage1_lr": lr,
                "opd_lr": olr, "train_seconds": round(osecs, 1), **evaluator(oexport)}
        rows.append(orow)
        log(f"{oname}: {fmt(orow)}")
        save()

    # every recipe at its first setting first (a run cut short still has all four), then the other settings
    objectives = [(o, lrs) for o, lrs in (("sft", sft_lrs), ("forward_kl", kl_lrs)) if lrs]
    order = [(o, lrs[0]) for o, lrs in objectives] + [(o, lr) for o, lrs in objectives for lr in lrs[1:]]
    done = []
    for objective, lr in order:
        short = "sft" if objective == "sft" else "fkl"
        name = f"{short}@{lr:g}"
        export = os.path.join(work, name)
        secs = stage1(s, objective, lr, w, export, data_file)
        row = {"name": name, "recipe": short, "stage1": objective, "stage1_lr": lr, "opd_lr": None,
               "train_seconds": round(secs, 1), **evaluator(export)}
        rows.append(row)
        log(f"{name}: {fmt(row)}")
        save()
        if opd_lrs:
            opd(objective, short, lr, name, export, opd_lrs[0])
        done.append((objective, short, lr, name, export))
    for args in done:
        for olr in opd_lrs[1:]:
            opd(*args, olr)
    out = summary()
    if json_path:
        write_results(json_path, out)
    return out


def merge(paths: list[str]) -> dict:
    """One summary from several runs' JSON files (e.g. the SFT and forward-KL recipes run as two processes with the
    same settings): the teacher row once, every other row, the stage-2 deltas recomputed."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    first = parts[0]
    for p in parts[1:]:
        differ = {k for k in first["settings"] if first["settings"][k] != p["settings"].get(k)}
        if differ:
            raise ValueError(f"merge: settings differ in {sorted(differ)}")
    rows = [first["rows"][0]] + [r for p in parts for r in p["rows"] if r["recipe"] != "teacher"]
    out = {**first, "rows": rows, "stage2_deltas": stage2_deltas(rows), "merged_from": len(parts),
           "seconds": max(p["seconds"] for p in parts), "seconds_per_part": [p["seconds"] for p in parts]}
    for key in ("sft_lrs", "kl_lrs", "opd_lrs"):
        out[key] = sorted({x for p in parts for x in p[key]}, reverse=True)
    out["stage1_data"] = next((p["stage1_data"] for p in parts if p.get("stage1_data")), None)
    return out


def fmt(r: dict) -> str:
    return " ".join(f"{k} {r[k]:.4f}" for k in METRICS + ("zero_ratio", "sampled_zero_ratio") if k in r)


def table(summary: dict) -> str:
    cols = ("nll", "kl_to_teacher", "reverse_kl", "top1_agreement", "zero_ratio", "sampled_zero_ratio", "lmeval_acc")
    head = f"{'run':>24} " + " ".join(f"{c[:12]:>12}" for c in cols)
    lines = [head]
    for r in summary["rows"]:
        lines.append(f"{r['name']:>24} " + " ".join(f"{r[c]:12.4f}" if c in r else f"{'-':>12}" for c in cols))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps each (< 3 min on one thread)")
    p.add_argument("--out", default=None, help="work folder for the runs (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, help="also write the summary here (atomically, refreshed after each run)")
    p.add_argument("--csv", default=None, help="also write the rows here")
    p.add_argument("--sft-lrs", type=float, nargs="+", default=None, help="stage-1 SFT learning rates")
    p.add_argument("--kl-lrs", type=float, nargs="+", default=None, help="stage-1 forward-KL learning rates")
    p.add_argument("--opd-lrs", type=float, nargs="+", default=None, help="stage-2 learning rates")
    p.add_argument("--stage1", nargs="+", choices=("sft", "fkl"), default=("sft", "fkl"),
                   help="stage-1 objectives to run (default both)")
    p.add_argument("--stage1-steps", type=int, default=None)
    p.add_argument("--opd-steps", type=int, default=None)
    p.add_argument("--gen-prompts", type=int, default=None)
    p.add_argument("--gen-samples", type=int, default=None, help="teacher samples per prompt")
    p.add_argument("--opd-samples", type=int, default=None, help="student samples per prompt in stage 2")
    p.add_argument("--no-opd", action="store_true", help="stage 1 only")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only merge these runs' --json files into --json / --csv and print the table")
    p.add_argument("--ppo", action="store_true", help="stage 2 with PPO-clip instead of the exact reverse KL")
    p.add_argument("--no-lmeval", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        summary = merge(args.merge)
        if args.json:
            write_results(args.json, summary)
        if args.csv:
            write_csv(args.csv, summary["rows"])
        print(table(summary))
        print(json.dumps(clean({k: summary[k] for k in ("bench", "group_w", "stage2_deltas", "seconds")}),
                         allow_nan=False))
        return summary
    s = QUICK if args.quick else FULL
    for field, value in (("stage1_steps", args.stage1_steps), ("opd_steps", args.opd_steps),
                         ("gen_prompts", args.gen_prompts), ("gen_samples", args.gen_samples),
                         ("opd_samples", args.opd_samples)):
        if value is not None:
            s = replace(s, **{field: value})
    if args.ppo:
        s = replace(s, exact_reverse_kl=False)
    if args.no_lmeval:
        s = replace(s, lmeval=False)
    sft_lrs = tuple(args.sft_lrs or (s.sft_lr,)) if "sft" in args.stage1 else ()
    kl_lrs = tuple(args.kl_lrs or (s.kl_lr,)) if "fkl" in args.stage1 else ()
    opd_lrs = () if args.no_opd else tuple(args.opd_lrs or (1e-4,))
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        summary = run(s, sft_lrs, kl_lrs, opd_lrs, args.out, log, args.json)
    else:
        with tempfile.TemporaryDirectory(prefix="zeda-recipes-") as tmp:
            summary = run(s, sft_lrs, kl_lrs, opd_lrs, tmp, log, args.json)
    if args.csv:
        write_csv(args.csv, summary["rows"])
    print(table(summary))
    final = {k: summary[k] for k in ("bench", "group_w", "stage1_data", "stage2_deltas", "seconds")}
    final["rows"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in summary["rows"]]
    final["quick"] = bool(args.quick)
    print(json.dumps(clean(final), allow_nan=False))
    return summary


if __name__ == "__main__":
    main()
