"""Local data files, read and checked without tokenising: the file types ``datasets`` loads here, the row formats,
and one-line errors naming the file, the line and the field. No Lightning: commands that only read rows
(``generate``, ``budget``) import this, not the data module."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc

from zeda_lightning.data.validate import suspect_rows

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
    suspects = suspect_rows(ds.data.table, prompts_only, chat_answer)  # None: check every row
    rows = enumerate(ds) if suspects is None else ((i, ds[i]) for i in suspects.tolist())
    for i, row in rows:
        problem = _row_problem(row, cols, prompts_only, chat_answer, needed)
        if problem:
            raise ValueError(f"{path}, {_where(path, builder, i)}: {problem}")
    return ds


def _check_file(path: str) -> None:
    """The checks of :func:`load_rows` that need no parsing (same messages), run before a file is hashed."""
    if not os.path.isfile(path):
        raise ValueError(f"data file not found: {path}")
    _builder(path)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty; give a file with at least one row")


def _domains_of(ds) -> set[str]:
    if "domain" not in ds.column_names:
        return set()
    return {d for d in pc.unique(ds.data.table.column("domain")).to_pylist() if d}
