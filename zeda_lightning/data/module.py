"""``ZedaDataModule``: local jsonl / json / parquet / text files through ``datasets.load_dataset``.

Row formats (one per file, detected per row):
    {"text": ...}                          loss on every token (pretraining, KL on plain text)
    {"prompt": ..., "response": ...}       loss on the response tokens only (stage-1 teacher samples)
    {"messages": [{"role", "content"}]}    chat template applied; loss on the last assistant turn only
Any row may carry ``"domain"`` (e.g. code / prose / math) for per-domain metrics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

IGNORE_INDEX = -100
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def _builder(path: str) -> str:
    suffixes = [s for s in Path(path).suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    ext = suffixes[-1] if suffixes else ""
    if ext not in _BUILDERS:
        raise ValueError(f"{path}: unsupported data file type {ext!r}; use one of {sorted(_BUILDERS)} (optionally .gz)")
    return _BUILDERS[ext]


def _as_list(files: str | Sequence[str] | None) -> list[str]:
    if files is None:
        return []
    return [files] if isinstance(files, str) else list(files)


def load_rows(path: str, prompts_only: bool = False):
    """Load one local file with ``datasets`` and check every row names a known format; errors name file and line.

    ``prompts_only``: rows for sampling (``prompt`` or ``messages`` without the answer, or ``text``).
    """
    import datasets

    if not os.path.isfile(path):
        raise ValueError(f"data file not found: {path}")
    builder = _builder(path)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty; give a file with at least one row")
    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as err:  # datasets raises many types for malformed files; name the file either way
        raise ValueError(f"{path}: could not be read as {builder}: {type(err).__name__}: {err}") from err
    if len(ds) == 0:
        raise ValueError(f"{path}: the file has no rows; give a file with at least one row")
    cols = set(ds.column_names)
    needed = "'text', 'prompt'" + ("" if prompts_only else " and 'response'") + " or 'messages'"
    if not cols & {"text", "prompt", "messages"}:
        raise ValueError(f"{path}: rows need {needed}; found columns {sorted(cols)}")
    for i, row in enumerate(ds):
        where = f"{path}, line {i + 1}"
        if row.get("text") is not None:
            fields = ["text"]
        elif row.get("prompt") is not None:
            fields = ["prompt"] if prompts_only else ["prompt", "response"]
        elif row.get("messages") is not None:
            fields = ["messages"]
        else:
            fields = ["text" if "text" in cols else "prompt" if "prompt" in cols else "messages"]
        for field in fields:
            value = row.get(field)
            if value is None or (isinstance(value, (str, list)) and len(value) == 0):
                raise ValueError(f"{where}: missing or empty field {field!r} (rows need {needed})")
    return ds


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning resumes mid-epoch (``state_dict`` / ``load_state_dict``): it counts the batches
    it has yielded in the current pass, and after a restore skips that many, so a resumed run sees the same batches
    as one that was never stopped."""

    _yielded = 0
    _skip = 0

    def __iter__(self):
        it = super().__iter__()
        skip, self._skip = self._skip, 0
        skip = skip if skip < len(self) else 0  # saved at the end of a pass: the next pass starts afresh
        for _ in range(skip):
            next(it)
        self._yielded = skip
        for batch in it:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["batches"])


class ZedaDataModule(L.LightningDataModule):
    """Tokenised, masked batches for distillation and pretraining.

    Args:
        tokenizer: path of a transformers tokenizer (usually the teacher's directory).
        train_files: training file(s): .jsonl/.json/.parquet/.txt, optionally gzipped.
        val_files: validation file(s).
        test_files: test file(s).
        max_length: tokens per sequence; longer rows are truncated on the right.
        packing: concatenate ``text`` rows of the same domain into full ``max_length`` blocks (pretraining); else
            one row per sequence, padded per batch.
        batch_size: sequences per training batch (per process).
        eval_batch_size: sequences per validation / test batch (default: batch_size).
        num_workers: DataLoader workers.
        seed: seed of the training shuffle.
        add_eos: append the tokenizer's EOS to every text / response.
        prompts: also build left-padded prompt tensors (``prompt_ids``, ``prompt_mask``) for on-policy sampling;
            rows may then be prompt-only, and a ``text`` row's prompt is its first ``prompt_tokens`` tokens.
        prompt_tokens: prompt length cut from ``text`` rows when ``prompts`` is on.
    """

    def __init__(
        self,
        tokenizer: str,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        max_length: int = 256,
        packing: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        add_eos: bool = True,
        prompts: bool = False,
        prompt_tokens: int = 32,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer_path = tokenizer
        self.files = {"train": _as_list(train_files), "val": _as_list(val_files), "test": _as_list(test_files)}
        self.max_length = max_length
        self.packing = packing
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.add_eos = add_eos
        self.prompts = prompts
        self.prompt_tokens = prompt_tokens
        if prompts and packing:
            raise ValueError("ZedaDataModule: prompts=True needs packing=False (one prompt per row)")
        self.tokenizer = None
        self.domains: list[str] = []
        self.datasets: dict[str, Any] = {}
        self._raw: dict[str, list] | None = None

    # -- loading ---------------------------------------------------------------------------------------------
    def load_tokenizer(self):
        from transformers import AutoTokenizer

        if not os.path.isdir(self.tokenizer_path):
            raise ValueError(f"tokenizer directory not found: {self.tokenizer_path}")
        tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    def check(self) -> None:
        """Load and validate every file and the tokenizer (no tokenisation yet): bad input fails here, early."""
        if self._raw is not None:
            return
        if not any(self.files.values()):
            raise ValueError("ZedaDataModule: no data files; set train_files / val_files / test_files")
        self.tokenizer = self.tokenizer or self.load_tokenizer()
        self._raw = {
            split: [(f, load_rows(f, prompts_only=self.prompts)) for f in files] for split, files in self.files.items()
        }
        domains = set()
        for parts in self._raw.values():
            for _, ds in parts:
                if "domain" in ds.column_names:
                    domains.update(d for d in ds["domain"] if d)
        self.domains = sorted(domains)

    def prepare_data(self) -> None:
        self.check()

    def setup(self, stage: str | None = None) -> None:
        self.check()
        for split, parts in self._raw.items():
            if parts and split not in self.datasets:
                self.datasets[split] = self._tokenize(parts)

    # -- tokenisation ------------------------------------------------------------------------------------------
    def _encode_row(self, row: dict) -> tuple[list[int], list[int], int]:
        """``(input_ids, labels, prompt length)``."""
        tok, eos = self.tokenizer, [self.tokenizer.eos_token_id] if self.add_eos else []
        if row.get("text") is not None:
            ids = tok(row["text"], add_special_tokens=False)["input_ids"] + eos
            return ids, list(ids), min(self.prompt_tokens, len(ids))
        if row.get("prompt") is not None:
            prompt_ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
            if not row.get("response"):  # a prompt-only row (on-policy sampling): nothing to learn from directly
                return prompt_ids, [IGNORE_INDEX] * len(prompt_ids), len(prompt_ids)
            response_ids = tok(row["response"], add_special_tokens=False)["input_ids"] + eos
        else:
            messages = row["messages"]
            if messages[-1]["role"] != "assistant":
                raise ValueError("a 'messages' row must end with an assistant turn (the tokens trained on)")
            prompt_text = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full_text = tok.apply_chat_template(messages, tokenize=False)
            if not full_text.startswith(prompt_text):
                raise ValueError("chat template: the conversation does not start with its generation prompt")
            prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
            response_ids = tok(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids, len(prompt_ids)

    def _tokenize(self, parts: list) -> list[dict[str, Any]]:
        domain_idx = {d: i for i, d in enumerate(self.domains)}
        rows = []
        for _, ds in parts:
            for row in ds:
                ids, labels, prompt_len = self._encode_row(row)
                rows.append({"input_ids": ids, "labels": labels, "domain": domain_idx.get(row.get("domain"), -1),
                             "prompt_len": prompt_len})
        if self.packing:
            return self._pack(rows)
        n = self.max_length
        return [{**r, "input_ids": r["input_ids"][:n], "labels": r["labels"][:n], "prompt_len": min(r["prompt_len"], n)}
                for r in rows]

    def _pack(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Concatenate rows per domain and cut full blocks (a block never mixes domains)."""
        streams: dict[int, tuple[list[int], list[int]]] = {}
        for r in rows:
            ids, labels = streams.setdefault(r["domain"], ([], []))
            ids += r["input_ids"]
            labels += r["labels"]
        blocks, n = [], self.max_length
        for domain in sorted(streams):
            ids, labels = streams[domain]
            for i in range(0, len(ids) - n + 1, n):
                blocks.append({"input_ids": ids[i : i + n], "labels": labels[i : i + n], "domain": domain})
        return blocks

    def collate(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            input_ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            attention_mask[i, :n] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
               "domain": torch.tensor([b["domain"] for b in batch], dtype=torch.long)}
        if self.prompts:  # left-padded prompts, as decoder-only generation wants them
            plen = max(b["prompt_len"] for b in batch)
            out["prompt_ids"] = torch.full((len(batch), plen), pad, dtype=torch.long)
            out["prompt_mask"] = torch.zeros((len(batch), plen), dtype=torch.long)
            for i, b in enumerate(batch):
                n = b["prompt_len"]
                out["prompt_ids"][i, plen - n :] = torch.tensor(b["input_ids"][:n])
                out["prompt_mask"][i, plen - n :] = 1
        return out

    # -- loaders -----------------------------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"ZedaDataModule: no {split} data; set {split}_files")
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return (ResumableDataLoader if split == "train" else DataLoader)(
            self.datasets[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            generator=gen,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            drop_last=split == "train" and self.packing,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
