"""``TokenDataset``: a tokenised split as memory-mapped Arrow columns, read a batch at a time.

Columns (see :mod:`zeda_lightning.data.encode` and :mod:`zeda_lightning.data.pack`): ``input_ids`` (list of int32),
``domain`` (int32, index into the cache entry's own domain list), and either ``loss_start`` + ``prompt_len`` (int32,
one row per sequence: labels are the tokens from ``loss_start`` on) or, for packed blocks with masked tokens,
``loss_mask`` (list of bool). Nothing is copied into Python objects until a batch is asked for: the DataLoader
calls ``__getitems__`` with a batch's indices and gets one :class:`~zeda_lightning.data.collate.TokenBatch`.
Indexing with an int or a slice still returns row dicts (``input_ids``, ``labels``, ``domain``, ``prompt_len``),
as lists of Python ints, for code that looks at rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from zeda_lightning.data.collate import IGNORE_INDEX, TokenBatch


def _flat_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(flat values, lengths)`` of a list column (offsets and slicing respected)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values, lengths.astype(np.int64, copy=False)


class TokenDataset(torch.utils.data.Dataset):
    """Map-style dataset over a ``datasets.Dataset`` (memory-mapped Arrow) of token rows or packed blocks.

    ``domain_map[k]`` is the data module's index of the entry's domain ``k``.
    """

    def __init__(self, data, domain_map: np.ndarray) -> None:
        self.data = data  # datasets.Dataset: pickles by file path, so workers re-map the files
        self.domain_map = np.asarray(domain_map, dtype=np.int64)
        self.columns = set(data.column_names)
        self._table: pa.Table | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_table": None}

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            self._table = self.data.data.table
        return self._table

    def __len__(self) -> int:
        return len(self.data)

    def _domains(self, local: np.ndarray) -> np.ndarray:
        local = local.astype(np.int64, copy=False)
        if not len(self.domain_map):
            return np.full(len(local), -1, dtype=np.int64)
        return np.where(local >= 0, self.domain_map[np.clip(local, 0, None)], -1)

    def __getitems__(self, indices: list[int]) -> TokenBatch:
        part = self.table.take(pa.array(indices, type=pa.int64()))
        ids, lengths = _flat_values(part.column("input_ids"))
        batch = TokenBatch(ids=torch.from_numpy(ids.astype(np.int64, copy=False)), lengths=torch.from_numpy(lengths),
                           domain=torch.from_numpy(self._domains(part.column("domain").to_numpy())))
        if "loss_mask" in self.columns:
            mask, _ = _flat_values(part.column("loss_mask"))
            batch.loss_mask = torch.from_numpy(mask.astype(bool, copy=False))
        if "loss_start" in self.columns:
            batch.loss_start = torch.from_numpy(part.column("loss_start").to_numpy().astype(np.int64))
            batch.prompt_len = torch.from_numpy(part.column("prompt_len").to_numpy().astype(np.int64))
        return batch

    def _rows(self, indices: list[int]) -> list[dict[str, Any]]:
        batch = self.__getitems__(indices)
        ids, offsets = batch.ids.tolist(), [0, *np.cumsum(batch.lengths.numpy()).tolist()]
        rows = []
        for i in range(len(indices)):
            row_ids = ids[offsets[i] : offsets[i + 1]]
            if batch.loss_mask is not None:
                keep = batch.loss_mask[offsets[i] : offsets[i + 1]].tolist()
                labels = [t if k else IGNORE_INDEX for t, k in zip(row_ids, keep)]
            elif batch.loss_start is not None:
                start = int(batch.loss_start[i])
                labels = [IGNORE_INDEX] * min(start, len(row_ids)) + row_ids[start:]
            else:
                labels = list(row_ids)
            row = {"input_ids": row_ids, "labels": labels, "domain": int(batch.domain[i])}
            if batch.prompt_len is not None:
                row["prompt_len"] = int(batch.prompt_len[i])
            rows.append(row)
        return rows

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return self._rows(list(range(len(self))[index]))
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} rows")
        return self._rows([index % n])[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step = 1024
        for start in range(0, len(self), step):
            yield from self._rows(list(range(start, min(start + step, len(self)))))


__all__ = ["TokenDataset"]
