"""Cost of one ZEDA distillation training step against plain fine-tuning of the same student: time and peak memory.

What it measures
    The teacher is the tiny Qwen3-MoE of ``configs/teacher/pretrain.yaml`` (random init from its ``model_config``,
    seed 0, saved with the tokenizer of ``assets/tiny_tokenizer`` into a temporary directory), or ``--teacher DIR``
    (e.g. ``assets/tiny_teacher``). The student is ``ZedaDistillModule``'s own: the teacher plus N/2 zero experts per
    router (``ZeroExperts(seed=0)``), built with ``configure_model()``. The batch is random token ids (``--batch`` x
    ``--seq``), attention mask all ones, labels = input ids, the same batch for every step.

    1. Step time. ``distill`` = ``module.training_step(batch)`` (student forward under ``capture_routing``, teacher
       forward under ``no_grad``, forward KL + L_GA) + ``backward`` + ``AdamW.step``; ``sft`` = the same with
       ``objective="sft"`` (cross-entropy + L_GA, no teacher forward in training, so ~1.0x). The baseline ``student``
       is a plain fine-tune step of the same injected student: ``student(...).logits``, cross-entropy on the shifted
       labels, ``backward``, ``AdamW.step``; no teacher, no routing capture, no router loss. Target: distill / student
       <= 1.35 for ``forward_kl``. ``--trainable`` / ``--teacher-mode`` default to ``configs/tiny.yaml`` (full,
       separate). A per-phase breakdown (from the module's override points ``student_forward``, ``teacher_forward``,
       ``distill_loss``, ``aux_loss``) says where the extra time goes.
    2. Peak memory, all ``trainable="router_only"``: ``shared`` (``teacher_mode="shared_weights"``: the teacher is the
       student with its zero experts masked, one copy of the weights) and ``separate`` (own frozen teacher copy), both
       running ``training_step`` with forward KL, against ``student`` (plain cross-entropy step as above; built with
       ``shared_weights`` + ``sft`` so that only one copy of the weights is loaded). Target: shared / student <= 1.10.

Why
    ZEDA's pitch is cheap self-distillation: the teacher adds one forward without gradient (about a third of a
    forward + backward), and with ``shared_weights`` no second copy of the model. This checks that the module's real
    code path delivers that, rather than a hand-written imitation of it.

How it is timed
    All variants live in one process, each with its own module and optimiser. Each round runs
    ``student, v_a, student, v_b, student`` with the variants in a fresh random order, after ``--warmup`` untimed
    rounds; a variant's ratio is the median over ``--reps`` rounds of its time over the mean of the two ``student``
    steps around it, so a slow stretch of the shared machine hits both sides. ``--lr`` defaults to 0: AdamW does
    exactly the same work, but the weights (and so the routing, i.e. the share of skipped expert slots) stay the same
    in every repetition and every variant. One torch thread by default (``--threads``): on 2 cores shared with
    another job, 2 OpenMP threads made single steps vary by up to 7x.

How memory is measured
    CPU tensors have no torch-side peak counter, so each configuration runs in its own fresh interpreter (this
    script re-invoked with a hidden flag). It imports everything, loads the model code and runs a toy
    forward/backward/AdamW step first (one-time runtime allocations every configuration pays alike), resets the
    kernel's peak-RSS mark (``5 > /proc/self/clear_refs``) and reads its RSS right before building the module, then
    builds it, runs ``--mem-steps`` training steps and reads the peak RSS again. peak - baseline is what the
    configuration costs: weights, optimiser state, activations, logits, allocator slack. The peak is read as
    ``VmHWM`` from ``/proc/self/status``, the same per-process high-water mark that
    ``getrusage(RUSAGE_SELF).ru_maxrss`` reports, except that ``ru_maxrss`` of an exec'd child also keeps the
    parent's peak from before the exec (Linux carries it over in ``signal->maxrss``), which made every configuration
    read the parent's ~450 MB. The runs set ``MALLOC_MMAP_THRESHOLD_`` (``--mmap-threshold``, 128 KiB): glibc then
    maps every tensor block of that size or more on its own and unmaps it when freed, so the peak RSS follows live
    memory instead of heap fragmentation (with glibc's dynamic threshold, repeated runs of one configuration
    differed by up to 15%). Each configuration runs ``--mem-reps`` times in shuffled rounds; medians are reported.
    Torch's own view needs no fresh process: each configuration is built and stepped once more in the parent under
    ``torch.profiler`` (``profile_memory=True``), whose allocation events carry the CPU allocator's live total of
    the tensors allocated inside the profiled block; its maximum is the peak of live tensor bytes the configuration
    adds (no allocator slack, no Python objects; deterministic, so one run each).

Output: tables on stdout and ONE final JSON line. ``--quick`` (< 90 s on 2 cores): batch 8 x 128 tokens, fewer
repetitions, one RSS run per configuration; the ratios then differ somewhat from the default shape.

    python bench/distill_step.py --quick
    python bench/distill_step.py                          # a few minutes
    python bench/distill_step.py --teacher assets/tiny_teacher
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from _timing import PairedTiming, time_paired  # bench/ is on sys.path when a bench runs as a script
from zeda_lightning.analysis import zero_ratio
from zeda_lightning.losses import cross_entropy
from zeda_lightning.modules import ZedaDistillModule
from zeda_lightning.modules.distill import check_teacher_dir
from zeda_lightning.routing import ZeroExperts, capture_routing

ROOT = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = ROOT / "configs" / "teacher" / "pretrain.yaml"
TOKENIZER = ROOT / "assets" / "tiny_tokenizer"
TARGET_STEP_RATIO = 1.35
TARGET_MEM_RATIO = 1.10
#: memory configurations: ZedaDistillModule arguments (all router_only) and the step they run
MEM_CONFIGS = {
    "student": dict(objective="sft", teacher_mode="shared_weights", step="plain"),
    "shared": dict(objective="forward_kl", teacher_mode="shared_weights", step="distill"),
    "separate": dict(objective="forward_kl", teacher_mode="separate", step="distill"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", default=None,
                   help="teacher directory (transformers format); default: a random-init teacher with the\n"
                        "architecture of configs/teacher/pretrain.yaml, saved to a temporary directory")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default 16, --quick 8)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256, --quick 128)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 12, --quick 4); the median is reported")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2, --quick 1)")
    p.add_argument("--phase-reps", type=int, default=None,
                   help="repetitions of the per-phase breakdown (default 5, --quick 2; 0 = skip it)")
    p.add_argument("--mem-steps", type=int, default=None,
                   help="training steps per memory run before reading the peak (default 3, --quick 2)")
    p.add_argument("--mem-reps", type=int, default=None, help="memory runs per configuration (default 2, --quick 1)")
    p.add_argument("--no-torch-view", action="store_true",
                   help="skip the profiler runs (torch's view of peak tensor memory): RSS only")
    p.add_argument("--mmap-threshold", type=int, default=131072,
                   help="MALLOC_MMAP_THRESHOLD_ of the memory runs in bytes (default 128 KiB, see the\n"
                        "docstring); 0 = glibc's default dynamic threshold")
    p.add_argument("--trainable", default="full", choices=["full", "router_only", "router_and_experts"],
                   help="trainable preset of the step-time runs (default full, as configs/tiny.yaml)")
    p.add_argument("--teacher-mode", default="separate", choices=["separate", "shared_weights"],
                   help="teacher of the step-time runs (default separate, as configs/tiny.yaml;\n"
                        "shared_weights needs --trainable router_only)")
    p.add_argument("--lr", type=float, default=0.0,
                   help="AdamW learning rate (default 0: same work, weights and routing stay fixed)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, see the docstring)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch and of the round order")
    p.add_argument("--skip-time", action="store_true", help="measure memory only")
    p.add_argument("--skip-mem", action="store_true", help="measure step time only")
    p.add_argument("--quick", action="store_true", help="small run (< 90 s on 2 cores): 8 x 128 tokens, few reps")
    p.add_argument("--_mem-child", dest="mem_child", choices=sorted(MEM_CONFIGS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = {"batch": 8, "seq": 128, "reps": 4, "warmup": 1, "phase_reps": 2, "mem_reps": 1, "mem_steps": 2}
    full = {"batch": 16, "seq": 256, "reps": 12, "warmup": 2, "phase_reps": 5, "mem_reps": 2, "mem_steps": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def quiet() -> None:
    """Silence what is noise here: Lightning's ``self.log`` without a trainer, transformers' progress bars."""
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", message=".*self.log.*")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# -- teacher, batch, modules -------------------------------------------------------------------------------------


def make_teacher(out_dir: str) -> str:
    """Random-init teacher with the architecture of configs/teacher/pretrain.yaml (seed 0), plus the tokenizer."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = dict(yaml.safe_load(TEACHER_CONFIG.read_text())["model"]["init_args"]["model_config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(out_dir)
    return out_dir


def make_batch(args: argparse.Namespace, vocab_size: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab_size, (args.batch, args.seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build_module(teacher: str, objective: str, trainable: str, teacher_mode: str) -> ZedaDistillModule:
    module = ZedaDistillModule(teacher=teacher, routing=ZeroExperts(seed=0), objective=objective,
                               trainable=trainable, teacher_mode=teacher_mode)
    module.configure_model()
    return module.train()


def make_optimizer(module: ZedaDistillModule, lr: float) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]  # betas / weight decay of configs/tiny.yaml
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.1)


# -- steps -------------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """One training configuration: a module, its optimiser and the step it runs on the batch."""

    module: ZedaDistillModule
    optimizer: torch.optim.Optimizer
    kind: str  # "plain": student + cross-entropy; "distill": module.training_step

    def step(self, batch: dict[str, Tensor]) -> None:
        if self.kind == "plain":
            loss = plain_loss(self.module, batch)
        else:
            loss = self.module.training_step(batch, 0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def plain_loss(module: ZedaDistillModule, batch: dict[str, Tensor]) -> Tensor:
    """Plain fine-tuning loss of the injected student: next-token cross-entropy, nothing else."""
    logits = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return cross_entropy(logits[:, :-1], batch["labels"][:, 1:])


def make_runner(teacher: str, objective: str, trainable: str, teacher_mode: str, kind: str, lr: float) -> Runner:
    module = build_module(teacher, objective, trainable, teacher_mode)
    return Runner(module, make_optimizer(module, lr), kind)


@torch.no_grad()
def zero_share(module: ZedaDistillModule, batch: dict[str, Tensor]) -> float:
    """Share of the student's (token, slot) pairs routed to a zero expert on the batch."""
    with capture_routing(module.student) as records:
        module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return zero_ratio(records).item()


# -- step time ---------------------------------------------------------------------------------------------------


def phase_times(runner: Runner, batch: dict[str, Tensor]) -> dict[str, float]:
    """One step split into phases (seconds), through the module's override points for a distill runner."""
    module, out, mark = runner.module, {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        out[name] = now - mark
        mark = now

    if runner.kind == "plain":
        logits = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lap("student_forward")
        loss = cross_entropy(logits[:, :-1], batch["labels"][:, 1:])
        lap("loss")
    else:
        token_mask = batch["attention_mask"].reshape(-1).bool()
        logits, records = module.student_forward(batch)
        lap("student_forward")
        teacher_logits = module.teacher_forward(batch) if module.objective.needs_teacher else None
        lap("teacher_forward")
        loss = module.distill_loss(logits, teacher_logits, batch["labels"]) + module.aux_loss(records, token_mask)
        lap("loss")
    loss.backward()
    lap("backward")
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)
    lap("optimizer")
    return out


def phase_breakdown(runners: dict[str, Runner], batch: dict[str, Tensor], reps: int) -> dict[str, dict[str, float]]:
    """Median seconds per phase and runner, the runners interleaved within each repetition."""
    laps: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, runner in runners.items():
            laps[name].append(phase_times(runner, batch))
    return {name: {ph: statistics.median(l[ph] for l in runs) for ph in runs[0]} for name, runs in laps.items()}


def bench_time(teacher: str, batch: dict[str, Tensor], args: argparse.Namespace) -> tuple[PairedTiming, dict, float]:
    make = lambda objective, kind: make_runner(  # noqa: E731
        teacher, objective, args.trainable, args.teacher_mode, kind, args.lr)
    runners = {"student": make("sft", "plain"), "forward_kl": make("forward_kl", "distill"), "sft": make("sft", "distill")}
    share = zero_share(runners["forward_kl"].module, batch)
    run = {name: (lambda r=r: r.step(batch)) for name, r in runners.items()}
    timing = time_paired(run.pop("student"), run, args.reps, args.warmup, random.Random(args.seed))
    phases = phase_breakdown(runners, batch, args.phase_reps) if args.phase_reps > 0 else {}
    return timing, phases, share


def print_time(timing: PairedTiming, phases: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    print(f"\nstep time (trainable={args.trainable}, teacher_mode={args.teacher_mode}, lr={args.lr}, "
          f"median of {args.reps} rounds after {args.warmup} warm-up)")
    print(f"  {'student (plain CE)':<22} {timing.baseline_s * 1e3:9.1f} ms   1.000x")
    for name in timing.seconds:
        tag = f"  target <= {TARGET_STEP_RATIO}" if name == "forward_kl" else ""
        print(f"  {'distill ' + name:<22} {timing.seconds[name] * 1e3:9.1f} ms   {timing.ratio[name]:.3f}x{tag}")
    if not phases:
        return
    names = ["student_forward", "teacher_forward", "loss", "backward", "optimizer"]
    print(f"\nper-phase breakdown, ms (median of {args.phase_reps}):")
    print(f"  {'':<12}" + "".join(f"{n:>17}" for n in names) + f"{'total':>10}")
    for runner, laps in phases.items():
        cells = "".join(f"{laps[n] * 1e3:17.1f}" if n in laps else f"{'-':>17}" for n in names)
        print(f"  {runner:<12}{cells}{sum(laps.values()) * 1e3:10.1f}")


# -- peak memory -------------------------------------------------------------------------------------------------


def rss_kb() -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident set size of this process, in kB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    return {"rss": int(fields["VmRSS"].split()[0]), "hwm": int(fields["VmHWM"].split()[0])}


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0: ``5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def warm_runtime(teacher: str) -> None:
    """One-time allocations that every configuration pays alike: model code import, autograd, AdamW."""
    check_teacher_dir(teacher)  # imports the family's modeling code (meta device, no weights)
    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = torch.optim.AdamW([w], lr=0.0)
    (w @ w).square().mean().backward()
    opt.step()
    del w, opt
    gc.collect()


@contextlib.contextmanager
def torch_peak_tracker():
    """Peak live bytes of CPU tensors allocated inside the block, from the profiler's allocation events.

    Yields a dict that holds ``peak_bytes`` after the block (None if the profiler's event tree is unavailable).
    """
    result: dict[str, int | None] = {"peak_bytes": None}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    try:
        from torch._C._profiler import _EventType

        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        peak = 0
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == _EventType.Allocation:
                peak = max(peak, node.extra_fields.total_allocated)
        result["peak_bytes"] = peak
    except Exception as err:  # private profiler API: report, do not fail the RSS measurement
        print(f"torch view unavailable: {type(err).__name__}: {err}", file=sys.stderr)


def run_config(name: str, teacher: str, batch: dict[str, Tensor], args: argparse.Namespace) -> None:
    """Build memory configuration ``name`` and run ``--mem-steps`` training steps."""
    cfg = MEM_CONFIGS[name]
    runner = make_runner(teacher, cfg["objective"], "router_only", cfg["teacher_mode"], cfg["step"], args.lr)
    for _ in range(args.mem_steps):
        runner.step(batch)


def mem_child(args: argparse.Namespace) -> None:
    """Body of one memory run (a fresh interpreter): build one configuration, run steps, print one JSON line."""
    batch = make_batch(args, check_teacher_dir(args.teacher)["vocab_size"])
    warm_runtime(args.teacher)
    was_reset = reset_peak_rss()
    base = rss_kb()
    run_config(args.mem_child, args.teacher, batch, args)
    peak = rss_kb()["hwm"]
    print(json.dumps({"config": args.mem_child, "base_rss_kb": base["rss"], "base_hwm_kb": base["hwm"],
                      "peak_hwm_kb": peak, "hwm_reset": was_reset}))


def run_mem_child(name: str, teacher: str, args: argparse.Namespace) -> dict:
    """One memory run of configuration ``name`` in a fresh interpreter; RSS figures in MB above its baseline."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_mem-child", name, "--teacher", teacher,
           "--batch", str(args.batch), "--seq", str(args.seq), "--mem-steps", str(args.mem_steps),
           "--threads", str(args.threads), "--seed", str(args.seed), "--lr", str(args.lr)]
    env = dict(os.environ)
    if args.mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run {name!r} failed:\n{proc.stderr[-3000:]}")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    if not rec["hwm_reset"] or rec["peak_hwm_kb"] <= rec["base_hwm_kb"]:
        print(f"  warning: {name}: peak RSS could not be reset or never rose above the pre-build peak; "
              "the figure is an upper bound", file=sys.stderr)
    rec["rss_mb"] = (rec["peak_hwm_kb"] - rec["base_rss_kb"]) / 1024
    return rec


@dataclass
class MemResult:
    rss_mb: dict[str, float]  # config -> median peak RSS above the baseline
    runs: dict[str, list[float]]  # config -> every RSS figure
    torch_mb: dict[str, float | None]  # config -> profiler peak of live tensor bytes (None: not measured)


def torch_view_mb(name: str, teacher: str, batch: dict[str, Tensor], args: argparse.Namespace) -> float | None:
    """Torch's view: peak live tensor MB of building ``name`` and running its steps, here, under the profiler."""
    gc.collect()
    with torch_peak_tracker() as tracked:
        run_config(name, teacher, batch, args)
    gc.collect()
    return None if tracked["peak_bytes"] is None else tracked["peak_bytes"] / 2**20


def bench_mem(teacher: str, batch: dict[str, Tensor], args: argparse.Namespace) -> MemResult:
    """``--mem-reps`` RSS runs per configuration (fresh processes, shuffled rounds), then torch's view of each."""
    rng = random.Random(args.seed + 1)
    runs: dict[str, list[float]] = {name: [] for name in MEM_CONFIGS}
    for rep in range(args.mem_reps):
        order = list(MEM_CONFIGS)
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            runs[name].append(run_mem_child(name, teacher, args)["rss_mb"])
            print(f"  memory run {rep + 1}/{args.mem_reps} {name}: {runs[name][-1]:.1f} MB RSS "
                  f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
    torch_mb: dict[str, float | None] = {name: None for name in MEM_CONFIGS}
    if not args.no_torch_view:  # allocation sizes are deterministic: one run each is enough
        for name in MEM_CONFIGS:
            torch_mb[name] = torch_view_mb(name, teacher, batch, args)
    rss = {name: statistics.median(v) for name, v in runs.items()}
    return MemResult(rss, {n: [round(x, 1) for x in v] for n, v in runs.items()}, torch_mb)


def mem_ratio(values: dict[str, float | None], name: str) -> float | None:
    if values.get(name) is None or not values.get("student"):
        return None
    return values[name] / values["student"]


def print_mem(mem: MemResult, args: argparse.Namespace) -> None:
    print(f"\npeak memory above baseline (trainable=router_only, {args.mem_steps} steps, "
          f"median of {args.mem_reps} fresh process(es) each)")
    print(f"  {'config':<10} {'RSS MB':>9} {'ratio':>7} {'torch MB':>10} {'ratio':>7}  runs (RSS MB)")
    for name in MEM_CONFIGS:
        torch_mb, t_ratio = mem.torch_mb[name], mem_ratio(mem.torch_mb, name)
        t_cells = f"{torch_mb:10.1f} {t_ratio:6.3f}x" if torch_mb is not None else f"{'-':>10} {'-':>7}"
        tag = f"  target <= {TARGET_MEM_RATIO}" if name == "shared" else ""
        print(f"  {name:<10} {mem.rss_mb[name]:9.1f} {mem_ratio(mem.rss_mb, name):6.3f}x {t_cells}  "
              f"{mem.runs[name]}{tag}")


# -- main --------------------------------------------------------------------------------------------------------


def summary(timing: PairedTiming | None, share: float | None, mem: MemResult | None, teacher_src: str,
            args: argparse.Namespace) -> dict:
    out: dict = {}
    if timing is not None:
        out |= {
            "step_time_ratio_forward_kl": round(timing.ratio["forward_kl"], 4),
            "step_time_ratio_sft": round(timing.ratio["sft"], 4),
            "student_step_s": round(timing.baseline_s, 4),
            "distill_step_s": round(timing.seconds["forward_kl"], 4),
            "sft_step_s": round(timing.seconds["sft"], 4),
            "meets_step_time_target": timing.ratio["forward_kl"] <= TARGET_STEP_RATIO,
            "student_zero_slot_share": round(share, 4),
        }
    if mem is not None:
        r = lambda v: None if v is None else round(v, 4)  # noqa: E731
        out |= {
            "peak_mem_ratio_shared_vs_student": r(mem_ratio(mem.rss_mb, "shared")),
            "peak_mem_ratio_separate_vs_student": r(mem_ratio(mem.rss_mb, "separate")),
            "torch_peak_mem_ratio_shared_vs_student": r(mem_ratio(mem.torch_mb, "shared")),
            "torch_peak_mem_ratio_separate_vs_student": r(mem_ratio(mem.torch_mb, "separate")),
            "peak_rss_mb": {n: round(v, 1) for n, v in mem.rss_mb.items()},
            "torch_peak_mb": {n: r(v) for n, v in mem.torch_mb.items()},
            "meets_mem_target": mem_ratio(mem.rss_mb, "shared") <= TARGET_MEM_RATIO,
        }
    return out | {
        "targets": {"step_time_ratio": TARGET_STEP_RATIO, "peak_mem_ratio": TARGET_MEM_RATIO},
        "batch": args.batch, "seq": args.seq, "trainable": args.trainable, "teacher_mode": args.teacher_mode,
        "threads": torch.get_num_threads(), "reps": args.reps, "mem_reps": args.mem_reps, "teacher": teacher_src,
    }


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    if args.mem_child:
        return mem_child(args)
    with tempfile.TemporaryDirectory(prefix="zeda-bench-teacher-") as tmp:
        teacher = args.teacher or make_teacher(tmp)
        teacher_src = args.teacher or f"random init of {TEACHER_CONFIG.relative_to(ROOT)}"
        teacher_cfg = check_teacher_dir(teacher)
        batch = make_batch(args, teacher_cfg["vocab_size"])
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, teacher {teacher_src}, "
              f"batch {args.batch} x {args.seq}", flush=True)
        timing = share = mem = None
        if not args.skip_time:
            t0 = time.perf_counter()
            timing, phases, share = bench_time(teacher, batch, args)
            print_time(timing, phases, args)
            print(f"  student zero-slot share on the batch: {share:.3f}   ({time.perf_counter() - t0:.1f}s)")
        if not args.skip_mem:
            t0 = time.perf_counter()
            mem = bench_mem(teacher, batch, args)
            print_mem(mem, args)
            print(f"  ({time.perf_counter() - t0:.1f}s)")
    out = summary(timing, share, mem, teacher_src, args)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
