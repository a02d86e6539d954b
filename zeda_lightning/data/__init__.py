"""Offline data for the embedded teacher: a three-domain corpus (code, prose, math) and its tokenizer.

Nothing here downloads anything: the corpus is built from the Python standard library that every
install ships (source files, docstrings, ``pydoc_data.topics``) plus seeded, generated arithmetic.
``zeda_lightning.data.corpus`` builds it (``python -m zeda_lightning corpus``), ``zeda_lightning.data.tokenizer``
trains a byte-level BPE on it (``python -m zeda_lightning tokenizer``).
Names are imported lazily so that ``python -m zeda_lightning.data.corpus`` runs without a runpy warning
and importing the package does not pull in ``transformers``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DOMAINS": "corpus",
    "SPLITS": "corpus",
    "build_corpus": "corpus",
    "read_jsonl": "corpus",
    "train_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "ZedaDataModule": "module",
    "load_rows": "module",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
