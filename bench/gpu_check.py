"""One prepared GPU check: the package's real paths on one CUDA device in a few minutes, ONE JSON line.

What it runs (each section's failure is recorded under ``errors`` and the others still run)
    1. ``moe_block``  ``bench/moe_block.py`` at the Qwen3-30B-A3B and GLM-4.7-Flash real block shapes, bf16,
       ``grouped_mm``, tokens 1 / 16 / 512 / 4096: the block's time at 0.5 zero share over the original's per T.
    2. ``tiny_fit``  ``python -m zeda_lightning fit --config configs/tiny.yaml`` through the package's LightningCLI
       (``ZedaCLI``) with overrides only for the device, ``bf16-mixed``, the steps (validation once, at the last
       step) and the output paths: steps/s of the training batches (validation excluded), the train loss and the
       val metrics at that fixed step.
    3. ``generate``  prefill and decode tokens/s of the student the tiny fit exported against its teacher
       (``assets/tiny_teacher``), paired rounds (``bench/_timing.py``); prefill = one forward over (B, S) tokens
       with last-token logits, decode = ``generate`` of D new tokens (greedy, ``min_new_tokens`` = D) after a
       16-token prompt. The student's realised zero share on the prefill is reported beside it.
    4. ``slice_fit``  a Qwen3-30B-A3B real-architecture slice (``python -m zeda_lightning slice``: the real config
       cut to 2 MoE layers, random bf16 weights in the hub layout) fitted for a few steps with the shipped
       ``configs/qwen3_30b_a3b/sft.yaml``, overriding only the device (1), the strategy (``FSDPStrategy``, then
       ``ModelParallelStrategy``), precision, steps, batch, lengths and paths (data: the tiny corpus; tokenizer:
       the slice's). Steps/s, losses and val metrics per strategy.

``--device cpu --quick`` runs the same code at small sizes in < 90 s on 1 thread, so the script cannot rot
(``tests/bench/test_gpu_check.py``): the MoE blocks at the real configs with small dims (``--override``), 16
tokens; 6 tiny-fit steps on small batches; a small Qwen3 slice (the real config with small dims); only
``ModelParallelStrategy`` (Lightning's ``FSDPStrategy`` refuses CPU). Budget on one H200 (not run yet): about
4-6 minutes, most of it writing and loading the ~3 GB slice.

    python bench/gpu_check.py                       # one CUDA device
    python bench/gpu_check.py --device cpu --quick  # the smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable

import torch
import yaml
from lightning.pytorch.callbacks import Callback

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

import moe_block  # noqa: E402
from _moe import SHAPES, real_config  # noqa: E402
from _timing import time_paired  # noqa: E402
from zeda_lightning.analysis import zero_ratio  # noqa: E402
from zeda_lightning.cli import CLI_SETTINGS, ZedaCLI  # noqa: E402
from zeda_lightning.export import from_pretrained  # noqa: E402
from zeda_lightning.routing import capture_routing  # noqa: E402
from zeda_lightning.slices import write_slice  # noqa: E402

TINY_YAML = os.path.join(ROOT, "configs", "tiny.yaml")
SLICE_YAML = os.path.join(ROOT, "configs", "qwen3_30b_a3b", "sft.yaml")
TINY_TEACHER = os.path.join(ROOT, "assets", "tiny_teacher")
CORPUS = {split: os.path.join(ROOT, "data", "tiny_corpus", f"{split}.jsonl.gz") for split in ("train", "val")}
#: --quick: the real configs with small dims (the same model classes, routing and block code)
SMALL_BLOCK = {
    "qwen3_30b_a3b": {"hidden_size": 128, "moe_intermediate_size": 32, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "head_dim": 32},
    "glm_4_7_flash": {"hidden_size": 128, "moe_intermediate_size": 32, "intermediate_size": 128, "q_lora_rank": 64,
                      "kv_lora_rank": 32, "num_attention_heads": 4, "num_key_value_heads": 4,
                      "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16},
}
#: --quick slice: vocabulary 2048 (the slice's tokenizer needs it), 16 experts of FFN 32, top-4
SMALL_SLICE = {**SMALL_BLOCK["qwen3_30b_a3b"], "vocab_size": 2048, "num_experts": 16, "num_experts_per_tok": 4,
               "intermediate_size": 128}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="small sizes (the CPU smoke run)")
    p.add_argument("--work", default=None, help="directory for the runs and the slice (default: a temporary one)")
    p.add_argument("--sections", nargs="+", default=["moe_block", "tiny_fit", "generate", "slice_fit"],
                   choices=["moe_block", "tiny_fit", "generate", "slice_fit"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU, torch's on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu --quick for the smoke run)")
    return args


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _finite(metrics: dict) -> dict:
    return {k: (round(float(v), 6) if math.isfinite(float(v)) else float(v)) for k, v in metrics.items()}


# -- fits through the package's CLI ------------------------------------------------------------------------------


class StepRate(Callback):
    """Seconds of each training batch (forward, backward, optimiser; validation excluded), synchronised on CUDA."""

    def __init__(self, device: str) -> None:
        self.device, self.times, self._t0 = device, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(self.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter() - self._t0)

    def steps_per_s(self) -> float:
        timed = self.times[1:] or self.times  # the first batch pays the one-time setup
        return len(timed) / sum(timed)


class TimedCLI(ZedaCLI):
    """The package's CLI with a :class:`StepRate` callback added after its own checks."""

    rate: StepRate

    def before_fit(self) -> None:
        super().before_fit()
        self.trainer.callbacks.append(self.rate)


def run_fit(configs: list[str], override: dict, work: str, name: str, device: str) -> dict:
    """``fit --config C1 [--config C2] --config <override>`` with a step timer; the metrics at the end."""
    path = os.path.join(work, f"{name}.override.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(override, f)
    args = ["fit"] + [a for c in (*configs, path) for a in ("--config", c)]
    rate = StepRate(device)
    TimedCLI.rate = rate
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = TimedCLI(**CLI_SETTINGS, args=args, run=True)
    metrics = {k: v for k, v in cli.trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    return {"steps": cli.trainer.global_step, "steps_per_s": round(rate.steps_per_s(), 4),
            "wall_s": round(time.perf_counter() - t0, 2), "metrics": _finite({k: v.item() for k, v in metrics.items()})}


def trainer_override(device: str, steps: int, root: str, val_batches: int, precision: str) -> dict:
    return {"accelerator": "gpu" if device == "cuda" else "cpu", "devices": 1, "precision": precision,
            "max_steps": steps, "max_epochs": None, "val_check_interval": steps, "check_val_every_n_epoch": None,
            "limit_val_batches": val_batches, "log_every_n_steps": 1, "default_root_dir": root,
            "enable_checkpointing": False, "enable_progress_bar": False, "callbacks": [],
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": root}}}


def tiny_fit(args: argparse.Namespace, work: str) -> dict:
    steps = 6 if args.quick else 200
    root = os.path.join(work, "tiny")
    override = {
        "trainer": trainer_override(args.device, steps, root, 2 if args.quick else 16, "bf16-mixed"),
        "model": {"init_args": {"export_dir": os.path.join(root, "student")}},
        "data": {"init_args": {"batch_size": 4 if args.quick else 16, "max_length": 64 if args.quick else 256}},
    }
    out = run_fit([TINY_YAML], override, work, "tiny", args.device)
    out["precision"], out["export_dir"] = "bf16-mixed", os.path.join(root, "student")
    return out


def slice_fit(args: argparse.Namespace, work: str) -> dict:
    """Write the Qwen3 slice, then fit it with each strategy that runs on the device."""
    t0 = time.perf_counter()
    slice_dir = os.path.join(work, "qwen3_slice")
    if args.quick:
        cfg, _, _ = real_config("qwen3_30b_a3b", moe_layers=2)
        cfg = {**cfg, **SMALL_SLICE}
        cfg_path = os.path.join(work, "qwen3_small_config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        write_slice(cfg_path, slice_dir, moe_layers=2, seed=args.seed)
    else:
        write_slice("qwen3_30b_a3b", slice_dir, moe_layers=2, seed=args.seed)
    out: dict = {"slice_write_s": round(time.perf_counter() - t0, 2), "slice_dir": slice_dir}
    strategies = {"ModelParallelStrategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                                            "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 1}}}
    if args.device == "cuda":  # Lightning's FSDPStrategy refuses CPU
        strategies = {"FSDPStrategy": {"class_path": "lightning.pytorch.strategies.FSDPStrategy",
                                       "init_args": {"state_dict_type": "sharded"}}, **strategies}
    steps = 3 if args.quick else 5
    for name, strategy in strategies.items():
        root = os.path.join(work, f"slice_{name}")
        trainer = trainer_override(args.device, steps, root, 1, "bf16-mixed" if args.device == "cuda" else "32-true")
        trainer["strategy"] = strategy
        override = {
            "trainer": trainer,
            "model": {"init_args": {"teacher": slice_dir, "global_batch_size": 1,
                                    "export_dir": os.path.join(root, "student")}},
            "data": {"init_args": {"tokenizer": slice_dir, "train_files": CORPUS["train"], "val_files": CORPUS["val"],
                                   "max_length": 32 if args.quick else 256, "batch_size": 1, "eval_batch_size": 1}},
        }
        out[name] = run_fit([SLICE_YAML], override, work, f"slice_{name}", args.device)
        out[name]["precision"] = trainer["precision"]
    return out


# -- MoE blocks and generation -----------------------------------------------------------------------------------


def moe_blocks(args: argparse.Namespace) -> dict:
    out = {}
    for shape in SHAPES:
        argv = ["--shape", shape, "--dtype", "bfloat16", "--device", args.device, "--impls", "grouped_mm"]
        if args.quick:
            argv += ["--tokens", "16", "--reps", "3", "--warmup", "1", "--threads", str(torch.get_num_threads()),
                     "--override", *(f"{k}={json.dumps(v)}" for k, v in SMALL_BLOCK[shape].items())]
        else:
            argv += ["--tokens", "1", "16", "512", "4096", "--reps", "30", "--warmup", "3", "--threads",
                     str(torch.get_num_threads())]
        with contextlib.redirect_stdout(io.StringIO()):  # one JSON line: the block bench's own table goes
            res = moe_block.main(argv)
        out[shape] = {
            "ratio_at_0.5": {t: r["by_impl"]["grouped_mm"]["0.5"] for t, r in res["by_tokens"].items()},
            "original_ms": {t: r["original_ms"]["grouped_mm"] for t, r in res["by_tokens"].items()},
            "ms_at_0.5": {t: r["variant_ms"]["grouped_mm"]["0.5"] for t, r in res["by_tokens"].items()},
            "realised_zero_ratio": {t: r["realised_zero_ratio"]["grouped_mm"]["0.5"]
                                    for t, r in res["by_tokens"].items()},
            "overrides": res["overrides"],
        }
    return out


def generation(args: argparse.Namespace, student_dir: str) -> dict:
    """Prefill and decode tokens/s, tiny student (the tiny fit's export) vs its teacher, paired."""
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    teacher = from_pretrained(TINY_TEACHER, dtype=dtype).to(args.device).eval()
    student = from_pretrained(student_dir, dtype=dtype).to(args.device).eval()
    batch, seq, new = (2, 32, 8) if args.quick else (16, 256, 64)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = teacher.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(args.device)
    prompt = ids[:, :16]
    rng = random.Random(args.seed)

    def prefill(model) -> Callable[[], None]:
        def run() -> None:
            model(input_ids=ids, logits_to_keep=1)
            _sync(args.device)
        return run

    def decode(model) -> Callable[[], None]:
        def run() -> None:
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
            _sync(args.device)
        return run

    reps, warmup = (3, 1) if args.quick else (10, 2)
    with torch.no_grad():
        with capture_routing(student) as records:
            student(input_ids=ids, logits_to_keep=1)
        share = zero_ratio(records).item()
        p = time_paired(prefill(teacher), {"student": prefill(student)}, reps, warmup, rng)
        d = time_paired(decode(teacher), {"student": decode(student)}, reps, warmup, rng)
    return {
        "batch": batch, "prefill_tokens": seq, "decode_new_tokens": new, "dtype": str(dtype).removeprefix("torch."),
        "student_zero_share_prefill": round(share, 4),
        "prefill_tok_s": {"teacher": round(batch * seq / p.baseline_s, 1),
                          "student": round(batch * seq / p.seconds["student"], 1)},
        "prefill_speedup": round(1 / p.ratio["student"], 4),
        "decode_tok_s": {"teacher": round(batch * new / d.baseline_s, 1),
                         "student": round(batch * new / d.seconds["student"], 1)},
        "decode_speedup": round(1 / d.ratio["student"], 4),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or (1 if args.device == "cpu" else torch.get_num_threads()))
    t_start = time.perf_counter()
    out: dict = {"device": args.device, "quick": args.quick, "torch": torch.__version__,
                 "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        work = args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_"))
        os.makedirs(work, exist_ok=True)
        plan: list[tuple[str, Callable[[], dict]]] = [
            ("moe_block", lambda: moe_blocks(args)),
            ("tiny_fit", lambda: tiny_fit(args, work)),
            ("generate", lambda: generation(args, out["tiny_fit"]["export_dir"])),
            ("slice_fit", lambda: slice_fit(args, work)),
        ]
        for name, section in plan:
            if name not in args.sections or (name == "generate" and "tiny_fit" not in out):
                continue
            t0 = time.perf_counter()
            try:
                out[name] = section()
            except Exception as err:  # one section failing must not lose the others' figures
                errors[name] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
            seconds[name] = round(time.perf_counter() - t0, 1)
            print(f"gpu_check: {name} {'failed' if name in errors else 'done'} in {seconds[name]}s",
                  file=sys.stderr, flush=True)
    out["seconds"] = {**seconds, "total": round(time.perf_counter() - t_start, 1)}
    out["errors"] = errors
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
