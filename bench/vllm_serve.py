"""The tiny student and teacher served by vLLM (the zeda plugin) against transformers fp32.

What it measures
    * correctness on 32 held-out prompts (the first 24 tokens of data/tiny_corpus/val documents), greedy, 16 new
      tokens: ``greedy_match`` (share of prompts whose vLLM continuation equals transformers' ``generate``),
      ``max_abs_logprob_diff`` (generated tokens' log-probabilities, vLLM against one transformers teacher-forced
      forward over the same tokens), ``zero_ratio_vllm`` (counted by the plugin's MoE blocks inside vLLM) and
      ``zero_ratio_hf`` (counted by ``capture_routing`` over the same routed tokens);
    * throughput: new tokens per second of the student and the teacher, in vLLM and in transformers
      (``generate`` with KV cache), at batch 1 (``--b1_prompts`` prompts one after the other) and batch 32 (one
      call), ``--new_tokens`` new tokens each with eos ignored, after one warm-up call per engine and model.

Why
    The student's zero slots must be skipped inside vLLM too (the plugin drops them before vLLM's fused-MoE
    kernel), with vLLM computing what transformers computes.

How
    The student is the tiny teacher (``assets/tiny_teacher``) with zero experts (``ZeroExperts(seed=0)``) and a
    zero-logit bias ``--zero_logit_bias`` (default 1.5: 80 % of the slots skipped by this untrained student),
    exported with the package's own ``inject`` / ``export_model``; or ``--student DIR``. vLLM runs in the vLLM environment
    (``bash scripts/vllm_env.sh``) through ``zeda_lightning.serving.run_vllm``, fp32, eager, one model per engine
    start. Single-threaded (``torch.set_num_threads(1)``; run with ``OMP_NUM_THREADS=1``). Output: one JSON line.

    OMP_NUM_THREADS=1 python bench/vllm_serve.py
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time

import torch
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from zeda_lightning import ZeroExperts, inject, set_zero_logit_bias  # noqa: E402
from zeda_lightning.analysis import zero_ratio  # noqa: E402
from zeda_lightning.export import export_model, from_pretrained  # noqa: E402
from zeda_lightning.routing import capture_routing  # noqa: E402
from zeda_lightning.sampling import eos_token_ids  # noqa: E402
from zeda_lightning.serving import run_vllm  # noqa: E402

TEACHER = os.path.join(ROOT, "assets", "tiny_teacher")


def heldout_prompts(tok, n: int, length: int) -> list[list[int]]:
    with gzip.open(os.path.join(ROOT, "data", "tiny_corpus", "val.jsonl.gz"), "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [x[:length] for x in ids if len(x) >= length][:n]


def hf_generate(lm, prompts: list[list[int]], new_tokens: int, eos, pad: int, ignore_eos: bool) -> tuple[list, float]:
    """transformers ``generate`` on equal-length prompts (no padding): continuations and wall seconds."""
    x = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = lm.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens if ignore_eos else None, eos_token_id=eos, pad_token_id=pad)
    seconds = time.perf_counter() - t0
    return [row[x.shape[1]:].tolist() for row in out], seconds


def hf_side(model_dir: str, prompts, new_tokens: int, b1: int, continuations=None) -> dict:
    lm = from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    eos, pad = eos_token_ids(lm, tok), tok.pad_token_id
    result = {}
    if continuations is not None:  # correctness against vLLM's greedy tokens
        greedy, diffs, zero, slots = [], [], 0.0, 0
        for ids, cont in zip(prompts, continuations):
            greedy.append(hf_generate(lm, [ids], 16, eos, pad, False)[0][0])
            with capture_routing(lm) as rec, torch.no_grad():
                logits = lm(torch.tensor([ids + cont["token_ids"][:-1]])).logits[0].float()
            lp = torch.log_softmax(logits[len(ids) - 1:], dim=-1).gather(1, torch.tensor(cont["token_ids"])[:, None])
            diffs += (lp[:, 0] - torch.tensor(cont["logprobs"])).abs().tolist()
            n = sum(r.skipped.numel() for r in rec.values())
            zero, slots = zero + float(zero_ratio(rec)) * n, slots + n
        result.update(greedy=greedy, max_abs_logprob_diff=max(diffs), zero_ratio=zero / slots)
    hf_generate(lm, prompts[:1], 4, eos, pad, True)  # warm-up
    seconds = sum(hf_generate(lm, [p], new_tokens, eos, pad, True)[1] for p in prompts[:b1])
    result["tps_b1"] = b1 * new_tokens / seconds
    _, seconds = hf_generate(lm, prompts, new_tokens, eos, pad, True)
    result["tps_b32"] = len(prompts) * new_tokens / seconds
    return result


def vllm_side(model_dir: str, prompts, new_tokens: int, b1: int, eos, correctness: bool) -> dict:
    def batch(p, n, **kw):
        return {"prompt_token_ids": p, "max_new_tokens": n, "temperature": 0.0, "eos_token_ids": eos, **kw}

    batches = [batch(prompts[:1], 4, ignore_eos=True)]  # warm-up: vLLM's first call initialises lazily
    batches += [batch([p], new_tokens, ignore_eos=True) for p in prompts[:b1]]
    batches += [batch(prompts, new_tokens, ignore_eos=True)]
    if correctness:
        batches += [batch(prompts, 16, logprobs=True)]
    reply = run_vllm({"model": model_dir, "dtype": "float32", "max_model_len": 512, "batches": batches})
    res = reply["results"]
    out = {"tps_b1": b1 * new_tokens / sum(r["seconds"] for r in res[1:1 + b1]),
           "tps_b32": len(prompts) * new_tokens / res[1 + b1]["seconds"], "load_seconds": reply["load_seconds"]}
    if correctness:
        last = res[-1]
        out.update(continuations=[o[0] for o in last["outputs"]], zero_ratio=last["zero_slots"] / last["slots"],
                   zero_ratio_b32=res[1 + b1]["zero_slots"] / res[1 + b1]["slots"])
    return out


def _model_name(teacher: str) -> str:
    """``tiny``, or the slice's source model and layer count (its ``zeda_slice.json`` marker), or the directory."""
    if os.path.abspath(teacher) == os.path.abspath(TEACHER):
        return "tiny"
    marker = os.path.join(teacher, "zeda_slice.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            info = json.load(f)
        return f"{info.get('source', 'model')} slice ({info.get('moe_layers')} MoE layers)"
    return os.path.basename(os.path.normpath(teacher))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default=TEACHER, help="the original model (default: assets/tiny_teacher; e.g. the "
                    "Qwen3 real-shape slice of `python -m zeda_lightning slice`)")
    ap.add_argument("--student", help="a zeda export of --teacher (default: built from it with --zero_logit_bias)")
    ap.add_argument("--zero_logit_bias", type=float, default=1.5)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--b1_prompts", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="zeda-vllm-bench-") as tmp:
        student = args.student
        if student is None:
            model = inject(from_pretrained(args.teacher), ZeroExperts(seed=0))
            set_zero_logit_bias(model, args.zero_logit_bias)
            student = export_model(model, os.path.join(tmp, "student"), AutoTokenizer.from_pretrained(args.teacher))
            del model
        tok = AutoTokenizer.from_pretrained(student)
        prompts = heldout_prompts(tok, 32, 24)
        eos = eos_token_ids(from_pretrained(student), tok)
        v_student = vllm_side(student, prompts, args.new_tokens, args.b1_prompts, eos, True)
        v_teacher = vllm_side(args.teacher, prompts, args.new_tokens, args.b1_prompts, eos, False)
        h_student = hf_side(student, prompts, args.new_tokens, args.b1_prompts, v_student["continuations"])
        h_teacher = hf_side(args.teacher, prompts, args.new_tokens, args.b1_prompts)
    tokens = [c["token_ids"] for c in v_student["continuations"]]
    result = {
        "bench": "vllm_serve", "model": _model_name(args.teacher), "prompts": len(prompts), "new_tokens": args.new_tokens,
        "zero_logit_bias": None if args.student else args.zero_logit_bias,
        "greedy_match": sum(a == b for a, b in zip(tokens, h_student["greedy"])) / len(prompts),
        "max_abs_logprob_diff": h_student["max_abs_logprob_diff"],
        "zero_ratio_vllm": round(v_student["zero_ratio"], 4), "zero_ratio_hf": round(h_student["zero_ratio"], 4),
        "zero_ratio_vllm_b32_ignore_eos": round(v_student["zero_ratio_b32"], 4),
        "tokens_per_s": {
            "vllm": {"student": {"b1": v_student["tps_b1"], "b32": v_student["tps_b32"]},
                     "teacher": {"b1": v_teacher["tps_b1"], "b32": v_teacher["tps_b32"]}},
            "hf": {"student": {"b1": h_student["tps_b1"], "b32": h_student["tps_b32"]},
                   "teacher": {"b1": h_teacher["tps_b1"], "b32": h_teacher["tps_b32"]}},
        },
        "vllm_load_seconds": {"student": v_student["load_seconds"], "teacher": v_teacher["load_seconds"]},
    }
    result["tokens_per_s"] = {e: {m: {b: round(v, 1) for b, v in d.items()} for m, d in ms.items()}
                              for e, ms in result["tokens_per_s"].items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
