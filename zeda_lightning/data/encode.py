"""Batched tokenisation of checked rows (``text`` / ``prompt`` + ``response`` / ``messages``) into Arrow columns.

:func:`encode_rows` returns the function ``datasets.Dataset.map(batched=True)`` runs over a file's rows (as Arrow
tables). Each batch goes through the fast tokenizer in a few batched calls (the texts, prompts, responses of the
batch at once); only ``messages`` rows render their chat template row by row (jinja), then are tokenised batched
too. Per row (same tokens and labels as tokenising it alone):

    text                 ids = tok(text) + [eos]       loss from token 0          prompt = first prompt_tokens
    prompt + response    ids = tok(prompt) + tok(response) + [eos]                loss from len(tok(prompt))
    prompt only          ids = tok(prompt)             no loss                    prompt = all of it
    messages             ids = tok(template(turns[:-1], generation prompt)) + tok(rest of template(turns))
                                                       loss from the assistant turn (the rest)

Output columns: ``input_ids`` (list of int32), ``loss_start``, ``prompt_len`` (int32), ``domain`` (int32, index into
the sorted domains given; -1: none). ``max_length``: keep the first ``max_length`` tokens (``None``: all, for
packing).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "loss_start": datasets.Value("int32"),
    "prompt_len": datasets.Value("int32"),
    "domain": datasets.Value("int32"),
})


class RowError(ValueError):
    """A row that cannot be tokenised; ``index`` is its position in the file's rows."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def batch_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """``texts -> ids`` without special tokens, one call per batch.

    The Rust tokenizer's ``encode_batch_fast`` (no offsets) when the transformers tokenizer wraps one, after
    checking on the first texts that it gives what ``tokenizer(text, add_special_tokens=False)`` gives; else the
    tokenizer's own batched call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    slow = lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # noqa: E731
    if backend is None or not hasattr(backend, "encode_batch_fast") or backend.truncation or backend.padding:
        return slow
    fast = lambda texts: [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]  # noqa: E731
    chosen: list[Callable] = []

    def encode(texts: list[str]) -> list[list[int]]:
        if not chosen and texts:
            sample = list(texts[:8])
            chosen.append(fast if fast(sample) == [list(x) for x in slow(sample)] else slow)
        return (chosen[0] if chosen else fast)(texts)

    return encode


def _column(batch: pa.Table, name: str) -> list | None:
    return batch.column(name).to_pylist() if name in batch.column_names else None


def encode_rows(tokenizer, *, add_eos: bool, prompt_tokens: int, domains: Sequence[str], max_length: int | None,
                tokenizer_name: str) -> Callable[[pa.Table, list[int]], pa.Table]:
    """The batched map function (``with_indices=True``, Arrow format) for one file's checked rows."""
    encode = batch_encoder(tokenizer)
    eos = [tokenizer.eos_token_id] if add_eos else []
    domain_index = {d: i for i, d in enumerate(domains)}

    def chat_parts(messages: list[dict], index: int) -> tuple[str, str]:
        if messages[-1]["role"] != "assistant":
            raise RowError(index, "field 'messages' must end with an assistant turn (the tokens trained on)")
        try:
            prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full_text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as err:  # jinja errors (raise_exception in a template), no template at all, ...
            raise RowError(index, f"field 'messages': the chat template of {tokenizer_name} failed "
                                  f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from err
        if not full_text.startswith(prompt_text):
            raise RowError(index, "field 'messages': the chat template's conversation does not start with its "
                                  "generation prompt, so the assistant turn cannot be cut off; use a tokenizer whose "
                                  "template renders the prompt as a prefix")
        return prompt_text, full_text[len(prompt_text):]

    def fn(batch: pa.Table, indices: list[int]) -> pa.Table:
        n = batch.num_rows
        text, prompt, response = _column(batch, "text"), _column(batch, "prompt"), _column(batch, "response")
        messages, domain = _column(batch, "messages"), _column(batch, "domain")
        none = [None] * n
        text, prompt, response, messages = text or none, prompt or none, response or none, messages or none
        ids: list[list[int] | None] = [None] * n
        loss_start = np.zeros(n, dtype=np.int32)
        prompt_len = np.zeros(n, dtype=np.int32)
        text_rows = [i for i in range(n) if text[i] is not None]
        pair_rows = [i for i in range(n) if text[i] is None and prompt[i] is not None]
        chat_rows = [i for i in range(n) if text[i] is None and prompt[i] is None]
        for i, row_ids in zip(text_rows, encode([text[i] for i in text_rows])):
            ids[i] = row_ids + eos
            prompt_len[i] = min(prompt_tokens, len(ids[i]))
        answered = [i for i in pair_rows if response[i]]
        for i, row_ids in zip(pair_rows, encode([prompt[i] for i in pair_rows])):
            ids[i] = row_ids
            loss_start[i] = prompt_len[i] = len(row_ids)
        for i, row_ids in zip(answered, encode([response[i] for i in answered])):
            ids[i] = ids[i] + row_ids + eos
        parts = [chat_parts(messages[i], indices[i]) for i in chat_rows]
        heads, tails = encode([p for p, _ in parts]), encode([t for _, t in parts])
        for i, head, tail in zip(chat_rows, heads, tails):
            ids[i] = head + tail
            loss_start[i] = prompt_len[i] = len(head)
        if max_length is not None:
            ids = [r[:max_length] for r in ids]
            np.minimum(loss_start, max_length, out=loss_start)
            np.minimum(prompt_len, max_length, out=prompt_len)
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=n)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
        dom = np.fromiter((domain_index.get(d, -1) for d in (domain or none)), dtype=np.int32, count=n)
        return pa.table({
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
            "loss_start": pa.array(loss_start), "prompt_len": pa.array(prompt_len), "domain": pa.array(dom),
        })

    return fn


def row_lengths(data: datasets.Dataset) -> np.ndarray:
    """Tokens per row of an encoded dataset."""
    column = data.data.table.column("input_ids")
    return np.concatenate([pc.list_value_length(c).to_numpy(zero_copy_only=False) for c in column.chunks]
                          or [np.zeros(0, dtype=np.int32)]).astype(np.int64)


__all__ = ["FEATURES", "RowError", "batch_encoder", "encode_rows", "row_lengths"]
