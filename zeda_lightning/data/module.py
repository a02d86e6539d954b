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
# files a transformers tokenizer is read from; a directory with none of them yields an empty tokenizer, silently
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
MIN_VOCAB = 32  # fewer tokens than this is no real tokenizer (an empty one has 1)
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


def _describe(value: Any) -> str:
    """``int 3`` / ``list [...]``: a value's type and a short repr, for one-line errors."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _row_problem(row: Any, cols: set[str], prompts_only: bool, chat_answer: bool, needed: str) -> str | None:
    """What is wrong with one row (``"field 'text' must be ..."``), or ``None``."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object with {needed}, got {_describe(row)}"
    if row.get("text") is not None:
        fields = ["text"]
    elif row.get("prompt") is not None:
        fields = ["prompt"] if prompts_only else ["prompt", "response"]
        response = row.get("response")
        if prompts_only and response is not None and not isinstance(response, str):  # "" = prompt-only, allowed
            return f"field 'response' must be a string, got {_describe(response)}; write it as a JSON string"
    elif row.get("messages") is not None:
        fields = ["messages"]
    else:
        fields = ["text" if "text" in cols else "prompt" if "prompt" in cols else "messages"]
    for field in fields:
        value = row.get(field)
        if value is None or (isinstance(value, (str, list)) and len(value) == 0):
            return f"missing or empty field {field!r} (rows need {needed})"
        if field == "messages":
            problem = _messages_problem(value, chat_answer)
            if problem:
                return problem
        elif not isinstance(value, str):
            return f"field {field!r} must be a string, got {_describe(value)}; write it as a JSON string"
    domain = row.get("domain")
    if domain is not None and not isinstance(domain, str):
        return f"field 'domain' must be a string (e.g. \"code\"), got {_describe(domain)}"
    return None


def _messages_problem(messages: Any, chat_answer: bool) -> str | None:
    fix = 'give a list of {"role": ..., "content": ...} objects'
    if not isinstance(messages, list):
        return f"field 'messages' must be a list of turns, got {_describe(messages)}; {fix}"
    for j, turn in enumerate(messages):
        if not isinstance(turn, dict):
            return f"field 'messages', turn {j + 1}: must be an object, got {_describe(turn)}; {fix}"
        for key in ("role", "content"):
            if turn.get(key) is None:
                return f"field 'messages', turn {j + 1}: missing {key!r}; {fix}"
            if not isinstance(turn[key], str):
                return f"field 'messages', turn {j + 1}: {key!r} must be a string, got {_describe(turn[key])}"
        if not turn["role"]:
            return f"field 'messages', turn {j + 1}: empty 'role'; {fix}"
    if chat_answer:
        roles = [turn["role"] for turn in messages]
        if "assistant" not in roles:
            return ("field 'messages' has no assistant turn; end the conversation with the assistant turn to train "
                    f"on (roles: {roles[:8]})")
        if roles[-1] != "assistant":
            return (f"field 'messages' must end with an assistant turn (the tokens trained on), but ends with "
                    f"{roles[-1]!r}; drop the trailing turns or add the assistant's answer")
    return None


def _open_text(path: str):
    import bz2
    import gzip
    import lzma

    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8")
    if path.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if path.endswith(".zst"):
        import zstandard  # datasets reads .zst with it too

        return zstandard.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _is_document(path: str) -> bool:
    """A json file holding one JSON array (``[{...}, ...]``) rather than one row per line."""
    with _open_text(path) as f:
        head = f.read(4096).lstrip()
    return head.startswith("[")


def _scan_json(path: str, check) -> str | None:
    """Read a json / jsonl file that ``datasets`` could not load with the standard library and return the first
    problem as ``"line N: ..."`` (or ``None``): Arrow's errors name neither the line nor the field."""
    import json

    try:
        if _is_document(path):
            with _open_text(path) as f:
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as err:
                    return f"line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
            for i, row in enumerate(rows):
                problem = check(row)
                if problem:
                    return f"row {i + 1}: {problem}"
            return None
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as err:
                    return (f"line {n}: not valid JSON ({err.msg} at column {err.colno}); each line must be one "
                            "JSON object")
                problem = check(row)
                if problem:
                    return f"line {n}: {problem}"
    except (OSError, UnicodeDecodeError, EOFError, ImportError) as err:  # unreadable: datasets' own error says so
        return f"cannot be read as UTF-8 JSON ({type(err).__name__}: {err})"
    return None


def _where(path: str, builder: str, index: int) -> str:
    """``line N`` of row ``index``: ``datasets`` skips blank lines of a jsonl file, so count them back in."""
    if builder == "json":
        try:
            if _is_document(path):
                return f"row {index + 1}"
            seen = -1
            with _open_text(path) as f:
                for n, line in enumerate(f, 1):
                    seen += bool(line.strip())
                    if seen == index:
                        return f"line {n}"
        except (OSError, UnicodeDecodeError, EOFError, ImportError):
            pass
    return f"line {index + 1}"


def load_rows(path: str, prompts_only: bool = False, chat_answer: bool = False):
    """Load one local file with ``datasets`` and check every row names a known format with fields of the right
    types; errors name file, line and field.

    ``prompts_only``: rows for sampling (``prompt`` or ``messages`` without the answer, or ``text``).
    ``chat_answer``: a ``messages`` row must end with an assistant turn (the tokens trained on).
    """
    import datasets

    if not os.path.isfile(path):
        raise ValueError(f"data file not found: {path}")
    builder = _builder(path)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty; give a file with at least one row")
    needed = "'text', 'prompt'" + ("" if prompts_only else " and 'response'") + " or 'messages'"
    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as err:  # datasets raises many types for malformed files; name the file either way
        if builder == "json":
            problem = _scan_json(path, lambda row: _row_problem(
                row, set(row) if isinstance(row, dict) else set(), prompts_only, chat_answer, needed))
            if problem:
                raise ValueError(f"{path}, {problem}") from err
        cause = err.__cause__ or err.__context__
        detail = f"{type(err).__name__}: {err}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
        raise ValueError(f"{path}: could not be read as {builder}: {' '.join(detail.split())}") from err
    if len(ds) == 0:
        raise ValueError(f"{path}: the file has no rows; give a file with at least one row")
    cols = set(ds.column_names)
    if not cols & {"text", "prompt", "messages"}:
        raise ValueError(f"{path}: rows need {needed}; found columns {sorted(cols)}")
    for i, row in enumerate(ds):
        problem = _row_problem(row, cols, prompts_only, chat_answer, needed)
        if problem:
            raise ValueError(f"{path}, {_where(path, builder, i)}: {problem}")
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
        for name, value, least in (("max_length", max_length, 1), ("batch_size", batch_size, 1),
                                   ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0),
                                   ("prompt_tokens", prompt_tokens, 1)):
            if value is None and name == "eval_batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"ZedaDataModule: {name} must be an integer >= {least}, got {value!r}; set "
                                 f"data.init_args.{name} to {'a positive number' if least else '0 or more'}")
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

        path = self.tokenizer_path
        if not os.path.isdir(path):
            raise ValueError(f"tokenizer directory not found: {path}")
        fix = ("point data.init_args.tokenizer at the teacher's tokenizer directory (one written by "
               "tokenizer.save_pretrained)")
        if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
            raise ValueError(f"tokenizer directory {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, "
                             f"...); {fix}")
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        except Exception as err:  # a broken / foreign tokenizer raises many types; name the directory either way
            raise ValueError(f"tokenizer directory {path} could not be loaded "
                             f"({type(err).__name__}: {' '.join(str(err).split())[:300]}); {fix}") from err
        if len(tok) < MIN_VOCAB:
            raise ValueError(f"tokenizer in {path} has only {len(tok)} tokens, no real vocabulary (are its vocab files "
                             f"missing?); {fix}")
        if self.add_eos and tok.eos_token_id is None:
            raise ValueError(f"tokenizer in {path} has no eos token, which add_eos appends to every row; set "
                             "eos_token in its tokenizer_config.json or data.init_args.add_eos: false")
        if tok.pad_token_id is None:
            if tok.eos_token_id is None:
                raise ValueError(f"tokenizer in {path} has neither a pad nor an eos token to pad batches with; set "
                                 "pad_token in its tokenizer_config.json")
            tok.pad_token = tok.eos_token
        return tok

    def check(self) -> None:
        """Load, validate and tokenise every file, with the tokenizer: bad input (including a split too short for
        one packed block) fails here, before anything is written. ``setup`` reuses the result."""
        if self._raw is not None:
            return
        if not any(self.files.values()):
            raise ValueError("ZedaDataModule: no data files; set train_files / val_files / test_files")
        self.tokenizer = self.tokenizer or self.load_tokenizer()
        raw = {
            split: [(f, load_rows(f, prompts_only=self.prompts, chat_answer=True)) for f in files]
            for split, files in self.files.items()
        }
        domains = set()
        for parts in raw.values():
            for _, ds in parts:
                if "domain" in ds.column_names:
                    domains.update(d for d in ds["domain"] if d)
        self.domains = sorted(domains)
        self.datasets.update({split: self._tokenize(parts, split) for split, parts in raw.items()
                              if parts and split not in self.datasets})
        self._raw = raw

    def prepare_data(self) -> None:
        self.check()

    def setup(self, stage: str | None = None) -> None:
        self.check()  # tokenises once; later calls reuse self.datasets

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
                raise ValueError("field 'messages' must end with an assistant turn (the tokens trained on)")
            try:
                prompt_text = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
                full_text = tok.apply_chat_template(messages, tokenize=False)
            except Exception as err:  # jinja errors (raise_exception in a template), no template at all, ...
                raise ValueError(f"field 'messages': the chat template of {self.tokenizer_path} failed "
                                 f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from err
            if not full_text.startswith(prompt_text):
                raise ValueError("field 'messages': the chat template's conversation does not start with its "
                                 "generation prompt, so the assistant turn cannot be cut off; use a tokenizer whose "
                                 "template renders the prompt as a prefix")
            prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
            response_ids = tok(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids, len(prompt_ids)

    def _tokenize(self, parts: list, split: str = "train") -> list[dict[str, Any]]:
        domain_idx = {d: i for i, d in enumerate(self.domains)}
        rows = []
        for path, ds in parts:
            for i, row in enumerate(ds):
                try:
                    ids, labels, prompt_len = self._encode_row(row)
                except ValueError as err:
                    raise ValueError(f"{path}, {_where(path, _builder(path), i)}: {err}") from err
                rows.append({"input_ids": ids, "labels": labels, "domain": domain_idx.get(row.get("domain"), -1),
                             "prompt_len": prompt_len})
        if self.packing:
            blocks = self._pack(rows)
            self._check_blocks(split, [path for path, _ in parts], rows, blocks)
            return blocks
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

    def _check_blocks(self, split: str, paths: list[str], rows: list[dict[str, Any]], blocks: list) -> None:
        """Packing drops each domain's last partial block (and training drops a partial batch): refuse a split that
        would be left with nothing instead of silently skipping validation or training."""
        n, files = self.max_length, paths[0] if len(paths) == 1 else f"{split} files {paths}"
        fix = f"give more {split} text, lower data.init_args.max_length, or set data.init_args.packing: false"
        if not blocks:
            total = sum(len(r["input_ids"]) for r in rows)
            if total < n:
                raise ValueError(f"{files}: {total} tokens, fewer than one packed block of max_length={n} (packing: "
                                 f"true), so the {split} split would be empty; {fix}")
            names = {i: d for i, d in enumerate(self.domains)}
            per: dict[str, int] = {}
            for r in rows:
                key = names.get(r["domain"], "(no domain)")
                per[key] = per.get(key, 0) + len(r["input_ids"])
            raise ValueError(f"{files}: {total} tokens, but no domain has one full packed block of max_length={n} "
                             f"(blocks never mix domains; tokens per domain: {per}), so the {split} split would be "
                             f"empty; {fix}")
        if split == "train" and len(blocks) < self.batch_size:
            raise ValueError(f"{files}: {len(blocks)} packed blocks of max_length={n}, fewer than one batch of "
                             f"batch_size={self.batch_size} (a partial training batch is dropped), so training would "
                             f"see no data; {fix}, or lower data.init_args.batch_size")

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
