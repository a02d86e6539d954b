"""The vLLM side of :func:`zeda_lightning.serving.run_vllm`: ``python -m zeda_lightning.serving.worker REQ REPLY``
in the vLLM environment.

The request (JSON) names the model, engine settings and batches of token-id prompts with their sampling settings;
the reply (JSON) holds, per batch, the generated token ids and texts (and the sampled tokens' log-probabilities when
asked), the wall time of the ``generate`` call and the slots the zeda blocks routed and skipped during it. The engine
runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the slot counters are read with ``apply_model``
without serialising code; prefix caching is off, so every prompt token is routed and counted.
"""

from __future__ import annotations

import json
import os
import sys
import time

from vllm import LLM, SamplingParams

from zeda_lightning.serving.plugin import reset_zero_slot_counts


def sampling_params(spec: dict, eos: list[int]):
    """vLLM sampling settings of one request (greedy at temperature 0, the whole vocabulary at top_k 0)."""
    temperature = float(spec.get("temperature", 0.0))
    return SamplingParams(
        n=int(spec.get("num_samples", 1)), temperature=temperature,
        top_p=float(spec.get("top_p", 1.0)) if temperature > 0 else 1.0,
        top_k=int(spec.get("top_k", 0)) or -1 if temperature > 0 else -1,
        max_tokens=int(spec["max_new_tokens"]), seed=spec.get("seed"),
        stop_token_ids=eos, logprobs=0 if spec.get("logprobs") else None,
        ignore_eos=bool(spec.get("ignore_eos", False)),
    )


def start_engine(req: dict, max_num_seqs: int = 32) -> tuple[LLM, bool]:
    """The engine a request describes (model, dtype, lengths, seed, KV cache bytes), in this process, eager, prefix
    caching off (every prompt token is routed and counted); returns it and whether it runs a zeda architecture, whose
    slot counters are then reset (the engine's warm-up forwards are not the user's tokens)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read by vLLM when the engine starts
    llm = LLM(model=req["model"], dtype=req.get("dtype", "auto"), max_model_len=int(req.get("max_model_len", 512)),
              enforce_eager=True, enable_prefix_caching=False, seed=int(req.get("seed", 0)),
              max_num_seqs=int(req.get("max_num_seqs", max_num_seqs)),
              # an explicit KV cache: vLLM's CPU default reserves 92 % of the machine's memory up front
              kv_cache_memory_bytes=int(req.get("kv_cache_memory_bytes", 256 << 20)))
    zeda = "Zeda" in (llm.llm_engine.model_config.architectures or [""])[0]
    if zeda:
        llm.apply_model(reset_zero_slot_counts)
    return llm, zeda


def main(request_path: str, reply_path: str) -> None:
    with open(request_path) as f:
        req = json.load(f)
    start = time.perf_counter()
    llm, zeda = start_engine(req)
    load_seconds = time.perf_counter() - start
    results = []
    for batch in req["batches"]:
        params = sampling_params(batch, [int(i) for i in batch.get("eos_token_ids", [])])
        prompts = [{"prompt_token_ids": ids} for ids in batch["prompt_token_ids"]]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        rows = []
        for out in outs:
            rows.append([{
                "token_ids": list(c.token_ids), "text": c.text,
                **({"logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]} if c.logprobs else {}),
            } for c in out.outputs])
        entry = {"outputs": rows, "seconds": seconds}
        if zeda:
            counts = llm.apply_model(reset_zero_slot_counts)[0]
            entry["slots"], entry["zero_slots"] = counts["slots"], counts["zero_slots"]
        results.append(entry)
    with open(reply_path, "w") as f:
        json.dump({"load_seconds": load_seconds, "architecture": llm.llm_engine.model_config.architectures,
                   "results": results}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
