"""FSDP2 on 2 CPU processes against 1 process on the tiny distillation: step time and peak memory per process.

What it measures
    ``ZedaDistillModule``'s own training step (student forward under ``capture_routing``, frozen teacher forward,
    forward KL + L_GA, backward, AdamW) on the embedded tiny teacher (``assets/tiny_teacher``, 3.6 M parameters)
    plus N/2 zero experts, with one global batch of ``--batch`` x ``--seq`` random token ids:

    ``one``  1 process, the unsharded path (``configure_model`` without a strategy), the whole batch;
    ``two``  2 processes (gloo), student and teacher sharded per decoder layer with FSDP2 (the path
             ``configs/tiny_fsdp_cpu.yaml`` runs), half of the batch each;
    every process with ``--threads`` torch threads (1 by default: on 2 cores shared with other jobs, 2 OpenMP
    threads in one process stall on each other far more than two processes do, which would flatter ``two``).

    Step time: median over ``--steps`` timed steps after ``--warmup`` (each step ends with a barrier, so it is the
    slowest rank's); ``--rounds`` alternate ``one`` and ``two`` so that a busy stretch of the machine hits both, and
    the medians over rounds are reported. Memory: peak resident set (``VmHWM``) of each process, and the bytes of parameters, gradients
    and optimiser states each process holds (counted from its local tensors).

Why
    Sharding must cut the per-process model states by the world size (what lets the 30B configs fit), and its cost
    on a model this small is all communication: the ratio says how much a step pays for it. The figures are for the
    tiny model on CPU; they do not predict GPU scaling.

Each configuration runs in fresh processes (``torch.multiprocessing.spawn``); the final line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _worker(rank: int, world: int, sharded: bool, port: int, args, out: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sharded:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from zeda_lightning.modules import ZedaDistillModule
    from zeda_lightning.routing import ZeroExperts

    module = ZedaDistillModule(teacher=args.teacher, routing=ZeroExperts(seed=0), objective="forward_kl")
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        from zeda_lightning.modules.builders import build_fsdp2

        module.use_models(build_fsdp2(module.spec, init_device_mesh("cpu", (world,)), torch.float32, None))
    else:
        module.configure_model()
    vocab = module.teacher_cfg["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    per = args.batch // world
    ids = ids[rank * per : (rank + 1) * per]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=args.lr)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = module.training_step(batch, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if sharded:
            dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    params = list(module.student.parameters())
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    teacher = list(module.teacher.parameters()) if module.teacher is not None else []
    result = {
        "rank": rank,
        "step_s": statistics.median(times),
        "first_loss": losses[0],
        "vm_hwm_mib": _vm_hwm_mib(),
        "state_mib": {
            "student": sum(_local_bytes(p) for p in params) / 2**20,
            "teacher": sum(_local_bytes(p) for p in teacher) / 2**20,
            "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None) / 2**20,
            "optimizer": sum(_local_bytes(v) for v in states) / 2**20,
        },
    }
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    if sharded:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, sharded: bool, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank")
        mp.spawn(_worker, args=(world, sharded, _free_port(), args, out), nprocs=world)
        results = []
        for r in range(world):
            with open(f"{out}.{r}") as f:
                results.append(json.load(f))
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=os.path.join(ROOT, "assets", "tiny_teacher"))
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of one and two")
    parser.add_argument("--lr", type=float, default=0.0, help="0: every step does the same work on the same weights")
    parser.add_argument("--quick", action="store_true", help="4 timed steps of 8 x 64 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.seq, args.rounds = 4, 2, 64, 1
    if args.batch % 2:
        raise SystemExit(f"--batch must be even (split over 2 processes), got {args.batch}")
    ones, twos = [], []
    for rnd in range(args.rounds):
        for kind in (("one", "two") if rnd % 2 == 0 else ("two", "one")):
            (ones if kind == "one" else twos).append(run(1, False, args) if kind == "one" else run(2, True, args))
    med = statistics.median
    one_s = med(r[0]["step_s"] for r in ones)
    two_s = med(max(x["step_s"] for x in r) for r in twos)
    one, two = ones[-1], twos[-1]
    summary = {
        "bench": "fsdp_cpu",
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "rounds": args.rounds,
        "threads_per_process": args.threads,
        "one_step_s": round(one_s, 4),
        "two_step_s": round(two_s, 4),
        "two_over_one_step_time": round(two_s / one_s, 3),
        "per_round_step_s": {"one": [round(r[0]["step_s"], 4) for r in ones],
                             "two": [round(max(x["step_s"] for x in r), 4) for r in twos]},
        "one_peak_rss_mib": round(max(r[0]["vm_hwm_mib"] for r in ones), 1),
        "two_peak_rss_mib_per_process": [round(max(r[i]["vm_hwm_mib"] for r in twos), 1) for i in range(2)],
        "one_state_mib": {k: round(v, 2) for k, v in one[0]["state_mib"].items()},
        "two_state_mib_per_process": {k: round(v, 2) for k, v in two[0]["state_mib"].items()},
        "first_loss_one": round(one[0]["first_loss"], 6),
        "first_loss_two": [round(r["first_loss"], 6) for r in two],
    }
    print(f"step time: one {summary['one_step_s']:.3f} s, two {summary['two_step_s']:.3f} s "
          f"({summary['two_over_one_step_time']:.2f}x); peak RSS: one {summary['one_peak_rss_mib']:.0f} MiB, two "
          f"{summary['two_peak_rss_mib_per_process']} MiB per process")
    print(f"model states per process (MiB): one {summary['one_state_mib']}, two {summary['two_state_mib_per_process']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
