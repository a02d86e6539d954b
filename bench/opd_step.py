"""Where an on-policy distillation step spends its time, and what zero-slot skipping buys while sampling.

One OPD step = sampling (student ``generate`` with KV cache, routing recorded) + scoring (teacher forward, and the
student's old log-probs under routing replay) + update (student forward/backward under replay, PPO-clip + L_GA,
optimiser step). Each phase is timed separately over repeated steps (median). Then sampling throughput of the
student (zero slots skipped) against the teacher on the same prompts, interleaved, same number of new tokens
(EOS disabled so both generate exactly ``max_new_tokens``). ``--engines hf vllm`` times the same step with rollouts
from the vLLM engine beside it (``rollout_engine: vllm``, no routing replay; its sampling time includes handing the
engine the student's weights every rollout), in the same run.

    python bench/opd_step.py [--student runs/tiny/student] [--quick] [--engines hf vllm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from zeda_lightning.analysis import zero_ratio
from zeda_lightning.data.module import ZedaDataModule
from zeda_lightning.modules import OnPolicyDistillModule
from zeda_lightning.routing import ZeroExperts, capture_routing


def _prompts(model_dir: str, batch: int, prompt_tokens: int) -> dict:
    dm = ZedaDataModule(tokenizer=model_dir, val_files="data/tiny_corpus/val.jsonl.gz", prompts=True,
                        prompt_tokens=prompt_tokens, max_length=prompt_tokens + 1)
    dm.setup("validate")
    return dm.collate(dm.datasets["val"][:batch])


def time_phases(module: OnPolicyDistillModule, batch: dict, reps: int) -> dict[str, float]:
    opt = torch.optim.AdamW([p for p in module.student.parameters() if p.requires_grad], lr=1e-5)
    phases: dict[str, list[float]] = {"sampling": [], "scoring": [], "update": []}
    for i in range(reps + 1):
        rollout = module.make_rollout(batch)  # the module's own sampling and scoring, each timed by it
        t2 = time.perf_counter()
        module._rollouts = {0: (module.global_step, rollout)}
        module.rollout_reuse = 10**9  # reuse the rollout just made: the update phase alone
        loss = module.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t3 = time.perf_counter()
        if i:  # first step is warm-up
            phases["sampling"].append(rollout["sample_s"])
            phases["scoring"].append(rollout["score_s"])
            phases["update"].append(t3 - t2)
    return {k: statistics.median(v) for k, v in phases.items()}


@torch.no_grad()
def sampling_throughput(model, batch: dict, new_tokens: int) -> float:
    t0 = time.perf_counter()
    out = model.generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], do_sample=True,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, top_k=0, pad_token_id=0)
    elapsed = time.perf_counter() - t0
    return (out.shape[1] - batch["prompt_ids"].shape[1]) * out.shape[0] / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="assets/tiny_teacher", help="teacher directory")
    parser.add_argument("--student", default=None, help="stage-1 student (default: teacher + fresh zero experts)")
    parser.add_argument("--batch", type=int, default=16, help="prompts per step")
    parser.add_argument("--samples", type=int, default=2, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens sampled per response")
    parser.add_argument("--reps", type=int, default=5, help="timed steps")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (fewer, shorter steps)")
    parser.add_argument("--engines", nargs="+", default=["hf"], choices=["hf", "vllm"],
                        help="rollout engines to time (vllm: the vLLM environment of scripts/vllm_env.sh)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.new_tokens, args.reps = 8, 24, 2
    batch = _prompts(args.teacher, args.batch, prompt_tokens=32)
    by_engine = {}
    for engine in args.engines:
        torch.manual_seed(0)
        module = OnPolicyDistillModule(teacher=args.teacher, student=args.student, routing=ZeroExperts(seed=0),
                                       num_samples=args.samples, max_new_tokens=args.new_tokens,
                                       rollout_engine=engine, routing_replay=engine == "hf",
                                       vllm_engine={"max_model_len": 512})
        module.configure_model()
        by_engine[engine] = time_phases(module, batch, args.reps)
        module.teardown("fit")
        if engine != "hf":
            print(f"{engine} rollouts: sampling {by_engine[engine]['sampling']:.3f} s per step")
    phases = by_engine[args.engines[0]]
    total = sum(phases.values())
    print(f"OPD step ({args.batch} prompts x {args.samples} samples, {args.new_tokens} new tokens), median of {args.reps}:")
    for k, v in phases.items():
        print(f"  {k:9s} {v:7.3f} s  {100 * v / total:5.1f} %")
    student, teacher = module.student.eval(), module.teacher.model
    with capture_routing(student) as rec:
        student(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"])
    zero = zero_ratio(rec, batch["prompt_mask"]).item()
    s_tps, t_tps = [], []
    for _ in range(max(2, args.reps // 2)):
        s_tps.append(sampling_throughput(student, batch, args.new_tokens))
        t_tps.append(sampling_throughput(teacher, batch, args.new_tokens))
    s, t = statistics.median(s_tps), statistics.median(t_tps)
    print(f"sampling tokens/s: student {s:.0f} (zero ratio {zero:.3f}) vs teacher {t:.0f}: {s / t:.3f}x")
    print(json.dumps({
        "sampling_s": round(phases["sampling"], 4), "scoring_s": round(phases["scoring"], 4),
        "update_s": round(phases["update"], 4),
        "sampling_share": round(phases["sampling"] / total, 3),
        "student_sampling_tok_s": round(s, 1), "teacher_sampling_tok_s": round(t, 1),
        "sampling_speedup": round(s / t, 3), "zero_ratio": round(zero, 3),
        "batch": args.batch, "samples": args.samples, "new_tokens": args.new_tokens,
        **({"vllm_sampling_s": round(by_engine["vllm"]["sampling"], 4),
            "vllm_rollout_speedup": round(by_engine["hf"]["sampling"] / by_engine["vllm"]["sampling"], 3)}
           if {"hf", "vllm"} <= set(by_engine) else {}),
    }))


if __name__ == "__main__":
    main()
