"""The on-disk cache of tokenised splits: one directory per (data content, tokenizer, settings).

An entry is ``<root>/<key>/`` holding Arrow files written by ``datasets.Dataset.map`` and ``meta.json`` (domains,
row and token counts). ``key`` hashes the bytes of every data file (in order), the tokenizer's files, the library
versions that tokenise, and every setting that changes the tokens (``max_length``, ``packing``, ``add_eos``,
``prompts``, ``prompt_tokens``) plus :data:`FORMAT`: change any of them and the entry is a different one.

The data files' digests are remembered in ``<root>/digests/`` with each file's size, inode, mtime and ctime, so a
file is read to hash it again only after it changed.

Entries are built once per machine and shared: the builder holds ``<key>.lock`` (other processes, e.g. the other
ranks, wait on it and then read the entry), writes into a temporary directory beside it and renames that to
``<key>`` only when complete, so a reader never sees half an entry and a killed build leaves only a temporary
directory (removed by the next build of that key). Reading an entry memory-maps its Arrow files; nothing in it is
executed or unpickled (``meta.json`` is JSON, the rest Arrow IPC).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import tokenizers
import transformers
from filelock import FileLock

from zeda_lightning.fsio import atomic_write, fsync_replace

FORMAT = 1  # bump when the layout or the meaning of a column changes
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
_SMALL = 64 << 20  # other files of the tokenizer directory (config.json, ...) count when smaller than this
META = "meta.json"


def default_root() -> str:
    """``$HF_DATASETS_CACHE/zeda_tokens`` (datasets' cache directory, ``~/.cache/huggingface/datasets``)."""
    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "zeda_tokens")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str, root: str | None = None) -> str:
    """sha256 of the file's bytes. With ``root``, remembered in ``<root>/digests/`` together with the file's size,
    inode, mtime and ctime: a later call reads the file again only when one of them changed (any write changes
    ctime, which cannot be set back), so a large corpus is not hashed again by every rank on every run."""
    if root is None:
        return _sha256(path)
    st = os.stat(path)
    stamp = [os.path.abspath(path), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    memo = os.path.join(root, "digests", hashlib.sha256(stamp[0].encode()).hexdigest()[:32] + ".json")
    try:
        with open(memo) as f:
            saved = json.load(f)
        if isinstance(saved, dict) and saved.get("stamp") == stamp and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, ValueError):
        pass
    digest = _sha256(path)
    with contextlib.suppress(OSError):  # a read-only cache still works, it just hashes again
        with atomic_write(memo) as f:
            json.dump({"stamp": stamp, "sha256": digest}, f)
    return digest


def tokenizer_digest(path: str) -> str:
    """Hash of the tokenizer directory's files (not the model weights), and of the libraries that read them."""
    h = hashlib.sha256(f"transformers {transformers.__version__} tokenizers {tokenizers.__version__}".encode())
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*")) +
                   glob.glob(os.path.join(glob.escape(path), "additional_chat_templates", "*")))
    for name in files:
        base = os.path.basename(name)
        if not os.path.isfile(name) or base.endswith(_WEIGHTS):
            continue
        if base not in _TOKENIZER_NAMES and os.path.getsize(name) > _SMALL:
            continue
        h.update(os.path.relpath(name, path).encode() + b"\0" + _sha256(name).encode())
    return h.hexdigest()


def entry_key(file_digests: Sequence[str], tokenizer: str, settings: dict[str, Any]) -> str:
    """The entry of these files (their :func:`file_digest`, in order), tokenizer (its :func:`tokenizer_digest`) and
    settings."""
    spec = {"format": FORMAT, "files": list(file_digests), "tokenizer": tokenizer, "settings": settings}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:40]


def read_entry(root: str, key: str) -> dict[str, Any] | None:
    """The entry's ``meta.json`` (with ``dir``), or ``None`` when there is no complete entry."""
    path = os.path.join(root, key)
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    files = meta.get("files") if isinstance(meta, dict) else None
    if (meta.get("format") != FORMAT or not isinstance(files, list) or
            not all(isinstance(n, str) and os.path.basename(n) == n and os.path.isfile(os.path.join(path, n))
                    for n in files)):
        return None
    return {**meta, "dir": path}


def build_entry(root: str, key: str, build: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """The entry ``key``: read if complete, else ``build(tmp_dir)`` (writes the Arrow files, returns the meta with
    ``files``: their names) under the key's lock, published by one rename."""
    os.makedirs(root, exist_ok=True)
    with FileLock(os.path.join(root, f"{key}.lock")):
        meta = read_entry(root, key)
        if meta is not None:
            return meta
        for stale in glob.glob(os.path.join(glob.escape(root), f".{key}.*")):  # a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = os.path.join(root, f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            meta = {**build(tmp), "format": FORMAT}
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f)
            final = os.path.join(root, key)
            if os.path.isdir(final):  # an incomplete entry (no meta): replace it
                shutil.rmtree(final)
            fsync_replace(tmp, final)  # durable: a crash after this leaves the whole entry or none
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    meta = read_entry(root, key)
    if meta is None:
        raise RuntimeError(f"tokenised data cache {os.path.join(root, key)} vanished after it was written")
    return meta


__all__ = ["FORMAT", "build_entry", "default_root", "entry_key", "file_digest", "read_entry", "tokenizer_digest"]
