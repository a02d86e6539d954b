"""Sample responses with transformers ``generate`` (KV cache): stage-1 data from the teacher, or any model.

``python -m zeda_lightning generate --model assets/tiny_teacher --prompts prompts.jsonl --out stage1.jsonl``
Prompt rows: ``{"prompt": ...}`` (plain text) or ``{"messages": [...]}`` (chat template applied); an optional
``domain`` is carried over. Output rows: ``{"prompt", "response", "domain"?}``, written atomically.
"""

from __future__ import annotations

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
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        elif row.get("prompt") is not None:
            text = row["prompt"]
        elif row.get("text") is not None:
            text = row["text"]
        else:
            raise ValueError(f"{path}, line {i + 1}: a prompt row needs 'prompt', 'text' or 'messages'")
        rows.append({"prompt": text, **({"domain": row["domain"]} if row.get("domain") else {})})
    return rows


def generate_responses(
    model: str,
    prompts: str,
    out: str,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Sample ``num_samples`` responses per prompt and write ``prompt``/``response`` jsonl rows.

    Args:
        model: transformers model directory (a zeda export is rebuilt with its routers).
        prompts: jsonl/json/parquet file of prompt rows.
        out: output jsonl path.
        max_new_tokens: most new tokens per response.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling threshold.
        num_samples: responses per prompt.
        batch_size: prompts per generate call.
        max_prompt_tokens: refuse prompts longer than this many tokens (default: context minus max_new_tokens).
        seed: sampling seed.
        overwrite: replace an existing ``out``.
    """
    from transformers import AutoTokenizer

    from zeda_lightning.export import from_pretrained

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite true to replace it")
    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows = _read_prompts(prompts, tok)
    lm = from_pretrained(model)
    limit = max_prompt_tokens or (lm.config.max_position_embeddings - max_new_tokens)
    encoded = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    too_long = [i + 1 for i, ids in enumerate(encoded) if len(ids) > limit]
    if too_long:
        raise ValueError(f"{prompts}: prompts on lines {too_long[:10]} exceed {limit} tokens; shorten them")
    torch.manual_seed(seed)
    results, n_tokens = [], 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = lm.generate(
                **batch,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=top_p if temperature > 0 else None,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new = gen[:, batch["input_ids"].shape[1] :]
        for j, seq in enumerate(new):
            src = chunk[j // num_samples]
            text = tok.decode(seq, skip_special_tokens=True)
            n_tokens += int((seq != tok.pad_token_id).sum())
            results.append({**src, "response": text})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gen-", dir=os.path.dirname(os.path.abspath(out)))
    with os.fdopen(fd, "w") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return {"rows": len(results), "new_tokens": n_tokens, "out": out}


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import auto_cli

    print(json.dumps(auto_cli(generate_responses, args=argv, as_positional=False)))
