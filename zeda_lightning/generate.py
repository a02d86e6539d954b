"""``python -m zeda_lightning generate``: stage-1 data sampled from the teacher (or any model), or one prompt answered.

``python -m zeda_lightning generate --model assets/tiny_teacher --prompts prompts.jsonl --out stage1.jsonl``
``python -m zeda_lightning generate --model runs/tiny/student --prompt "def parse(" --temperature 0``

The command's side only: reading the prompt file, writing the jsonl, timing and the zero-slot share. Sampling itself
(settings check, eos ids, loading, the batched ``generate`` call, ``generate_text``) is :mod:`zeda_lightning.sampling`.
Prompt rows: ``{"prompt": ...}`` (plain text) or ``{"messages": [...]}`` (chat template applied); an optional
``domain`` is carried over. Output rows: ``{"prompt", "response", "domain"?}``, written atomically.
"""

from __future__ import annotations

import json
import os
import time
import types

import torch
from transformers import AutoTokenizer, GenerationConfig

from zeda_lightning.analysis import zero_ratio
from zeda_lightning.data.files import load_rows
from zeda_lightning.fsio import atomic_write
from zeda_lightning.routing import capture_routing
from zeda_lightning.sampling import check_sampling, encode_prompts, eos_token_ids, load_for_generation, sample
from zeda_lightning.serving import check_servable, require_vllm_python, run_vllm

ENGINES = ("hf", "vllm")


def _read_prompts(path: str, tokenizer) -> list[dict]:
    ds = load_rows(path, prompts_only=True)
    rows = []
    for i, row in enumerate(ds):
        if row.get("messages") is not None:
            try:
                text = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
            except Exception as err:  # jinja errors (raise_exception in a template), no template at all, ...
                raise ValueError(f"{path}, line {i + 1}: field 'messages': the chat template failed "
                                 f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from err
        elif row.get("prompt") is not None:
            text = row["prompt"]
        elif row.get("text") is not None:
            text = row["text"]
        else:
            raise ValueError(f"{path}, line {i + 1}: a prompt row needs 'prompt', 'text' or 'messages'")
        rows.append({"prompt": text, **({"domain": row["domain"]} if row.get("domain") else {})})
    return rows


def _zero_ratio(rec: dict[int, list]) -> float:
    """Share of routed slots that went to zero experts over one ``generate`` call, prefill and decode together:
    :func:`zeda_lightning.analysis.zero_ratio` of each forward (every layer's record of one step has the same
    tokens), weighted by the forward's slots."""
    steps = list(zip(*(rec[layer] for layer in sorted(rec))))  # per forward: (layer 0's record, layer 1's, ...)
    slots = torch.tensor([float(step[0].skipped.numel()) for step in steps])
    ratios = torch.stack([zero_ratio(step) for step in steps])
    return round(float((ratios * slots).sum() / slots.sum()), 4)


def generate_responses(
    model: str,
    prompts: str | None = None,
    out: str | None = None,
    prompt: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_samples: int = 1,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    engine: str = "hf",
) -> dict:
    """Sample responses with a model: stage-1 jsonl rows for a prompt file, or one prompt answered.

    ``--prompts FILE --out FILE`` samples ``num_samples`` responses per prompt row and writes ``prompt``/``response``
    jsonl rows (atomically); ``--prompt TEXT`` returns the response with its token count, time and zero-slot ratio.

    Args:
        model: transformers model directory (a zeda export is rebuilt with its routers and compute budget).
        prompts: jsonl/json/parquet file of prompt rows (with ``out``).
        out: output jsonl path.
        prompt: one prompt text instead of a file; the response is printed (with its zero-slot ratio).
        max_new_tokens: most new tokens per response.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling threshold.
        top_k: sample among the k most likely tokens only (0 = the whole vocabulary, the default).
        num_samples: responses per prompt.
        batch_size: prompts per generate call.
        max_prompt_tokens: refuse prompts longer than this many tokens (default: context minus max_new_tokens).
        seed: sampling seed.
        overwrite: replace an existing ``out``.
        engine: ``hf`` (transformers ``generate``) or ``vllm`` (the zeda vLLM plugin, run in the vLLM environment
            that ``scripts/vllm_env.sh`` builds; a zeda export of a served family only).
    """
    if (prompt is None) == (prompts is None):
        raise ValueError("give either --prompt TEXT or --prompts FILE --out FILE (exactly one of them)")
    if prompts is not None and out is None:
        raise ValueError("--prompts needs --out FILE for the jsonl rows")
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   num_samples=num_samples, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens)
    if out is not None and os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite true to replace it")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}; pass --engine hf or --engine vllm")
    if engine == "vllm":
        return _generate_vllm(model, prompts, out, prompt, max_new_tokens, temperature, top_p, top_k, num_samples,
                              max_prompt_tokens, seed)
    if prompt is not None:
        lm, tok = load_for_generation(model)
        torch.manual_seed(seed)
        start = time.perf_counter()
        with capture_routing(lm, accumulate=True) as rec:
            texts, counts = sample(lm, tok, [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, top_k=top_k, num_samples=num_samples,
                                   max_prompt_tokens=max_prompt_tokens, where="--prompt")
        seconds = time.perf_counter() - start
        result = {"prompt": prompt, "response": texts[0] if num_samples == 1 else texts, "new_tokens": sum(counts),
                  "seconds": round(seconds, 4)}
        if rec:  # a model with injected routers
            result["zero_ratio"] = _zero_ratio(rec)
        return result
    lm, tok = load_for_generation(model)
    rows = _read_prompts(prompts, tok)
    # checked for the whole file before the first generate call (line numbers of the file, not of a batch)
    encode_prompts(tok, [r["prompt"] for r in rows],
                   max_prompt_tokens or (lm.config.max_position_embeddings - max_new_tokens), prompts)
    torch.manual_seed(seed)
    results, n_tokens = [], 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        texts, counts = sample(lm, tok, [r["prompt"] for r in chunk], max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, top_k=top_k, num_samples=num_samples,
                               max_prompt_tokens=max_prompt_tokens, where=prompts)
        n_tokens += sum(counts)
        results += [{**chunk[j // num_samples], "response": text} for j, text in enumerate(texts)]
    with atomic_write(out, "w") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"rows": len(results), "new_tokens": n_tokens, "out": out}


def _generate_vllm(model: str, prompts: str | None, out: str | None, prompt: str | None, max_new_tokens: int,
                   temperature: float, top_p: float, top_k: int, num_samples: int, max_prompt_tokens: int | None,
                   seed: int) -> dict:
    """``generate_responses`` on the vLLM engine: every check here first (model, vLLM environment, prompts), then
    one vLLM run in the vLLM environment; responses are decoded with the model's tokenizer as the hf engine does,
    and the zero-slot share is the one the plugin counted inside vLLM."""
    cfg = check_servable(model)
    require_vllm_python()
    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    try:
        gen_cfg = GenerationConfig.from_pretrained(model)
    except OSError:  # no generation_config.json: the tokenizer's eos only
        gen_cfg = GenerationConfig()
    eos = eos_token_ids(types.SimpleNamespace(generation_config=gen_cfg), tok)
    rows = [{"prompt": prompt}] if prompt is not None else _read_prompts(prompts, tok)
    where = "--prompt" if prompt is not None else prompts
    context = int(cfg.get("max_position_embeddings", 2048))
    encoded = encode_prompts(tok, [r["prompt"] for r in rows], max_prompt_tokens or (context - max_new_tokens), where)
    batch = {"prompt_token_ids": encoded, "max_new_tokens": max_new_tokens, "temperature": temperature,
             "top_p": top_p, "top_k": top_k, "num_samples": num_samples, "seed": seed, "eos_token_ids": eos}
    reply = run_vllm({"model": os.path.abspath(model), "max_model_len": context, "seed": seed, "batches": [batch]})
    result = reply["results"][0]
    samples = [c for outs in result["outputs"] for c in outs]  # text-major, num_samples each
    texts = [tok.decode(c["token_ids"], skip_special_tokens=True) for c in samples]
    n_tokens = sum(len(c["token_ids"]) for c in samples)
    zero = round(result["zero_slots"] / result["slots"], 4) if result.get("slots") else None
    if prompt is not None:
        return {"prompt": prompt, "response": texts[0] if num_samples == 1 else texts, "new_tokens": n_tokens,
                "seconds": round(result["seconds"], 4), "zero_ratio": zero, "engine": "vllm"}
    results = [{**rows[j // num_samples], "response": text} for j, text in enumerate(texts)]
    with atomic_write(out, "w") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"rows": len(results), "new_tokens": n_tokens, "out": out, "engine": "vllm", "zero_ratio": zero}


__all__ = ["generate_responses"]
