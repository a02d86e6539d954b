"""Byte-level BPE tokenizer for the offline corpus, wrapped as a ``transformers`` fast tokenizer.

* Pre-tokenization follows Qwen2: a regex split (contractions, letter runs, **single digits**, punctuation runs,
  newlines, spaces) then byte-level mapping, so every string round-trips exactly and numbers are spelled digit
  by digit, which helps a tiny model with arithmetic.
* Special tokens: ``<|endoftext|>`` (id 0: eos, pad and bos -- nothing is added automatically), ``<|im_start|>``
  and ``<|im_end|>`` (ids 1 and 2) for a ChatML chat template like Qwen's.
* Training is deterministic: texts are fed in file order and the trainer breaks ties by pair (any thread count).

Run ``python -m zeda_lightning tokenizer --data DIR --out DIR --vocab_size 2048``: trains on
``DIR/train.jsonl`` and prints stats (vocab size, mean characters per token per domain on ``DIR/val.jsonl``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from zeda_lightning.fsio import atomic_dir

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, IM_START, IM_END)

# Qwen2's pre-tokenizer split pattern (\p{N} alone: one token per digit).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, as Qwen's templates render it (without Qwen's default system prompt or tool handling).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def _as_paths(jsonl_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(jsonl_paths, (str, os.PathLike)):
        return [Path(jsonl_paths)]
    return [Path(p) for p in jsonl_paths]


def iter_texts(jsonl_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> Iterator[str]:
    """The ``text`` field of every row, in file order."""
    for path in _as_paths(jsonl_paths):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)["text"]


def build_backend_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> Any:
    """Train the raw ``tokenizers.Tokenizer`` (byte-level BPE) on ``texts``."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap(backend: Any, model_max_length: int | None = None) -> Any:
    """Wrap a trained ``tokenizers.Tokenizer`` as a ``PreTrainedTokenizerFast`` with the chat template."""
    kwargs: dict[str, Any] = {}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        **kwargs,
    )


def save_atomic(tokenizer: Any, out_dir: str | os.PathLike[str]) -> Path:
    """``save_pretrained`` into a temporary folder beside ``out_dir``, then swapped in for it (``fsio.atomic_dir``:
    the old one is moved aside, then removed; umask modes; a failure leaves ``out_dir`` as it was)."""
    out = Path(out_dir).resolve()
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
    return out


def train_tokenizer(
    jsonl_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None,
    vocab_size: int = 2048,
    *,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> Any:
    """Train a byte-level BPE on the texts of ``jsonl_paths``, save it to ``out_dir`` and return it.

    Pass the corpus' ``train.jsonl`` only (not val / test). ``out_dir=None`` skips saving. The result is a
    ``transformers.PreTrainedTokenizerFast`` that ``AutoTokenizer.from_pretrained(out_dir)`` loads offline.
    """
    # Deterministic as is: tokenizers' BPE trainer breaks count ties by pair, so thread count does not matter.
    backend = build_backend_tokenizer(iter_texts(jsonl_paths), vocab_size=vocab_size, min_frequency=min_frequency)
    tokenizer = wrap(backend, model_max_length=model_max_length)
    if out_dir is not None:
        save_atomic(tokenizer, out_dir)
    return tokenizer


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` from local files only."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def tokenizer_stats(tokenizer: Any, jsonl_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Docs, characters, tokens and mean characters per token for each domain of a corpus split."""
    per: dict[str, dict[str, float]] = {}
    for path in _as_paths(jsonl_path):
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        for row in rows:
            d = per.setdefault(row["domain"], {"docs": 0, "chars": 0, "tokens": 0})
            d["docs"] += 1
            d["chars"] += len(row["text"])
            d["tokens"] += len(tokenizer(row["text"], add_special_tokens=False)["input_ids"])
    for d in per.values():
        d["chars_per_token"] = round(d["chars"] / max(1, d["tokens"]), 3)
    total = {k: sum(v[k] for v in per.values()) for k in ("docs", "chars", "tokens")}
    total["chars_per_token"] = round(total["chars"] / max(1, total["tokens"]), 3)
    return {"vocab_size": len(tokenizer), "domains": dict(sorted(per.items())), "total": total}


def tokenizer_main(data: str, out: str, vocab_size: int = 2048, min_frequency: int = 2) -> dict[str, Any]:
    """Train the byte-level BPE tokenizer of the embedded teacher on a corpus; prints its stats.

    Args:
        data: corpus folder with train.jsonl (and val.jsonl for the stats)
        out: tokenizer output folder
        vocab_size: vocabulary size
        min_frequency: least count of a merged pair
    """
    folder = Path(data)
    tok = train_tokenizer(folder / "train.jsonl", out, vocab_size=vocab_size, min_frequency=min_frequency)
    stats: dict[str, Any] = {"out": str(Path(out).resolve()), "vocab_size": len(tok)}
    if (folder / "val.jsonl").exists():
        stats["val"] = tokenizer_stats(tok, folder / "val.jsonl")
    return stats
