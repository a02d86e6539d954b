"""Sampling from a model with transformers ``generate`` (KV cache): the library behind ``generate`` and on-policy
distillation.

- :func:`check_sampling` refuses settings ``generate`` would misread, before any model is loaded;
- :func:`eos_token_ids` every id generation must stop at;
- :func:`load_for_generation` a model directory, checked, with its tokenizer set up for left padding;
- :func:`sample` one batched ``generate`` call on loaded objects: decoded responses and their token counts;
- :func:`generate_text` the Python entry point (a directory or a loaded model + tokenizer);
- :func:`seeded` seeds sampling without touching the caller's random state.

Files are not this module's business: the ``generate`` command (:mod:`zeda_lightning.generate`) reads the prompt file,
writes the stage-1 jsonl and reports the zero-slot share; on-policy distillation (:mod:`zeda_lightning.modules.opd`)
samples on its own batches.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from transformers import AutoTokenizer, GenerationConfig

from zeda_lightning.export import check_model_dir, from_pretrained


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
    check_model_dir(model, require_tokenizer=True)
    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return from_pretrained(model), tok


def encode_prompts(tok, texts: list[str], limit: int, where: str) -> list[list[int]]:
    """Token ids of each prompt, refusing (by line number) any longer than ``limit`` tokens or empty, before
    anything is generated."""
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    too_long = [i + 1 for i, ids in enumerate(encoded) if len(ids) > limit]
    if too_long:
        raise ValueError(f"{where}: prompts on lines {too_long[:10]} exceed {limit} tokens; shorten them")
    empty = [i + 1 for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"{where}: prompts on lines {empty[:10]} are empty")
    return encoded


@torch.no_grad()
def sample_ids(lm, input_ids: Tensor, attention_mask: Tensor, *, max_new_tokens: int, temperature: float,
               top_p: float, top_k: int, num_samples: int, pad: int, eos: list[int],
               synced_gpus: bool = False) -> Tensor:
    """The one ``generate`` call (KV cache) behind stage-1 data, ``generate_text`` and stage-2 rollouts:
    ``(B * num_samples, P + G)`` ids, greedy at ``temperature == 0``. ``top_k`` is always passed (left unset,
    transformers' default would silently truncate to the top 50); nothing else comes from the model directory."""
    greedy = temperature == 0
    ours = GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None if greedy else top_k,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_samples,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    # NOTE: transformers fills every setting left unset from the model directory's generation_config.json
    # (repetition_penalty, suppress_tokens, bad_words_ids, min_new_tokens...): a downloaded file would silently
    # change stage-1 data and make rollouts off-policy. Only the settings above apply while sampling.
    saved = lm.generation_config
    lm.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id, eos_token_id=eos, pad_token_id=pad)
    try:
        return lm.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=ours,
                           synced_gpus=synced_gpus)
    finally:
        lm.generation_config = saved


def sample(lm, tok, texts: list[str], *, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
           num_samples: int, max_prompt_tokens: int | None, where: str) -> tuple[list[str], list[int]]:
    """transformers ``generate`` (KV cache) on left-padded ``texts``: ``num_samples`` decoded responses per text
    (text-major order) and their token counts. Skipped expert slots cost nothing in prefill and decode alike.
    ``where`` names the prompts' source in errors (a file, ``--prompt``)."""
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   num_samples=num_samples, max_prompt_tokens=max_prompt_tokens)
    encode_prompts(tok, texts, max_prompt_tokens or (lm.config.max_position_embeddings - max_new_tokens), where)
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    gen = sample_ids(lm, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, top_k=top_k, num_samples=num_samples,
                     pad=tok.pad_token_id, eos=eos_token_ids(lm, tok))
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
            out, _ = sample(lm, tok, texts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
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


__all__ = [
    "check_sampling", "encode_prompts", "eos_token_ids", "generate_text", "load_for_generation", "sample", "sample_ids",
    "seeded",
]
