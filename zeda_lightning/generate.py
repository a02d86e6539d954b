"""Sample responses with transformers ``generate`` (KV cache): stage-1 data from the teacher, or any model.

``python -m zeda_lightning generate --model assets/tiny_teacher --prompts prompts.jsonl --out stage1.jsonl``
``python -m zeda_lightning generate --model runs/tiny/student --prompt "def parse(" --temperature 0``
(``generate_text`` is the Python function.)
Prompt rows: ``{"prompt": ...}`` (plain text) or ``{"messages": [...]}`` (chat template applied); an optional
``domain`` is carried over. Output rows: ``{"prompt", "response", "domain"?}``, written atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import torch


def _read_prompts(path: str, tokenizer) -> list[dict]:
    from zeda_lightning.data.module import load_rows

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


def check_sampling(*, max_new_tokens: int, temperature: float, top_p: float, top_k: int, num_samples: int = 1,
                   batch_size: int = 1, max_prompt_tokens: int | None = None) -> None:
    """Refuse sampling settings ``generate`` would misread (a negative temperature silently turns greedy) or fail on
    only after the model is loaded."""

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    checks = [
        ("max_new_tokens", max_new_tokens, whole(max_new_tokens) and max_new_tokens >= 1, ">= 1"),
        ("temperature", temperature, isinstance(temperature, (int, float)) and temperature >= 0, ">= 0 (0 = greedy)"),
        ("top_p", top_p, isinstance(top_p, (int, float)) and 0 < top_p <= 1, "in (0, 1] (1 = no nucleus cut)"),
        ("top_k", top_k, whole(top_k) and top_k >= 0, ">= 0 (0 = the whole vocabulary)"),
        ("num_samples", num_samples, whole(num_samples) and num_samples >= 1, ">= 1"),
        ("batch_size", batch_size, whole(batch_size) and batch_size >= 1, ">= 1"),
        ("max_prompt_tokens", max_prompt_tokens,
         max_prompt_tokens is None or (whole(max_prompt_tokens) and max_prompt_tokens >= 1), ">= 1 (or unset)"),
    ]
    for name, value, ok, rule in checks:
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {value!r}; set {name} (--{name}) to such a value")


def eos_token_ids(lm, tok=None) -> list[int]:
    """Every end-of-sequence id: the generation config's (often a list: GLM ends an assistant turn with
    ``<|user|>``, Qwen3 with ``<|im_end|>``) plus the tokenizer's. Generation must stop at any of them."""
    ids = lm.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(int(tok.eos_token_id))
    return [int(i) for i in ids]


def load_for_generation(model: str):
    """``(model, tokenizer)`` from a directory, checked first: weights, config, tokenizer (left padding)."""
    from transformers import AutoTokenizer

    from zeda_lightning.export import check_model_dir, from_pretrained

    check_model_dir(model, require_tokenizer=True)
    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return from_pretrained(model), tok


def _sample(lm, tok, texts: list[str], *, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
            num_samples: int, max_prompt_tokens: int | None, where: str) -> tuple[list[str], list[int]]:
    """transformers ``generate`` (KV cache) on left-padded ``texts``: ``num_samples`` decoded responses per text
    (text-major order) and their token counts. Skipped expert slots cost nothing in prefill and decode alike."""
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   num_samples=num_samples, max_prompt_tokens=max_prompt_tokens)
    limit = max_prompt_tokens or (lm.config.max_position_embeddings - max_new_tokens)
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    too_long = [i + 1 for i, ids in enumerate(encoded) if len(ids) > limit]
    if too_long:
        raise ValueError(f"{where}: prompts on lines {too_long[:10]} exceed {limit} tokens; shorten them")
    empty = [i + 1 for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"{where}: prompts on lines {empty[:10]} are empty")
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        gen = lm.generate(
            **batch.to(lm.device),
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None,
            # explicit: left unset, transformers' default (or the checkpoint's) silently truncates to the top 50
            top_k=top_k if temperature > 0 else None,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos_token_ids(lm, tok),
        )
    new = gen[:, batch["input_ids"].shape[1] :]
    texts_out = [tok.decode(seq, skip_special_tokens=True) for seq in new]
    return texts_out, [int((seq != tok.pad_token_id).sum()) for seq in new]


def generate_text(
    model,
    prompt: str | list[str],
    tokenizer=None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> str | list[str]:
    """Continue ``prompt`` (one string or a list) with a model directory or a loaded model + ``tokenizer``.

    Greedy by default (``temperature=0``); ``top_k=0`` samples from the whole vocabulary. A zeda export keeps its
    compute budget (``config.zeda_budget``). The caller's tokenizer settings and random state are left as they were.
    """
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    if isinstance(model, str):
        lm, tok = load_for_generation(model)
    elif tokenizer is None:
        raise ValueError("generate_text with a loaded model needs its tokenizer: generate_text(model, prompt, tok)")
    else:
        lm, tok = model, tokenizer
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not texts:
        raise ValueError("generate_text needs at least one prompt")
    saved = tok.padding_side, tok.pad_token
    try:
        tok.padding_side = "left"  # decoder-only generation pads on the left
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        with seeded(seed, next(lm.parameters()).device):
            out, _ = _sample(lm, tok, texts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, num_samples=1, max_prompt_tokens=None, where="prompt")
    finally:
        tok.padding_side = saved[0]
        if saved[1] is None:
            tok.pad_token = None
    return out[0] if isinstance(prompt, str) else out


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Seed sampling without touching the caller's random state: the CPU generator and, since ``manual_seed``
    reseeds every accelerator too, that of ``device``."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


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
) -> dict:
    """Sample ``num_samples`` responses per prompt and write ``prompt``/``response`` jsonl rows, or answer one
    ``--prompt`` on stdout.

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
    """
    import time

    from zeda_lightning.routing import capture_routing

    if (prompt is None) == (prompts is None):
        raise ValueError("give either --prompt TEXT or --prompts FILE --out FILE (exactly one of them)")
    if prompts is not None and out is None:
        raise ValueError("--prompts needs --out FILE for the jsonl rows")
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   num_samples=num_samples, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens)
    if out is not None and os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite true to replace it")
    if prompt is not None:
        lm, tok = load_for_generation(model)
        torch.manual_seed(seed)
        start = time.perf_counter()
        with capture_routing(lm, accumulate=True) as rec:
            texts, counts = _sample(lm, tok, [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, top_k=top_k, num_samples=num_samples, max_prompt_tokens=max_prompt_tokens,
                                    where="--prompt")
        seconds = time.perf_counter() - start
        result = {"prompt": prompt, "response": texts[0] if num_samples == 1 else texts, "new_tokens": sum(counts),
                  "seconds": round(seconds, 4)}
        if rec:  # share of routed slots that went to zero experts, prefill and decode together
            skipped = [o.skipped.float() for outs in rec.values() for o in outs]
            result["zero_ratio"] = round(float(sum(s.sum() for s in skipped) / sum(s.numel() for s in skipped)), 4)
        return result
    lm, tok = load_for_generation(model)
    rows = _read_prompts(prompts, tok)
    limit = max_prompt_tokens or (lm.config.max_position_embeddings - max_new_tokens)
    encoded = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    too_long = [i + 1 for i, ids in enumerate(encoded) if len(ids) > limit]
    if too_long:  # checked for the whole file before the first generate call
        raise ValueError(f"{prompts}: prompts on lines {too_long[:10]} exceed {limit} tokens; shorten them")
    torch.manual_seed(seed)
    results, n_tokens = [], 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        texts, counts = _sample(lm, tok, [r["prompt"] for r in chunk], max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k, num_samples=num_samples,
                                max_prompt_tokens=max_prompt_tokens, where=prompts)
        n_tokens += sum(counts)
        results += [{**chunk[j // num_samples], "response": text} for j, text in enumerate(texts)]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gen-", dir=os.path.dirname(os.path.abspath(out)))
    with os.fdopen(fd, "w") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return {"rows": len(results), "new_tokens": n_tokens, "out": out}


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import auto_cli

    print(json.dumps(auto_cli(generate_responses, args=argv, as_positional=False), ensure_ascii=False))
