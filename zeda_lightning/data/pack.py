"""Per-domain packing of encoded rows into full ``max_length`` blocks, as one batched ``datasets`` map.

Same blocks as concatenating every row of a domain (rows in file order, files in the order given) and cutting it
into ``max_length`` pieces, the last partial piece of each domain dropped; domains in index order (-1, no domain,
first). A block never mixes domains. The rows are put in that order with a stable sort on the domain (an indices
mapping, no copy), then a sequential batched map carries each domain's unfinished block from one batch to the
next: numpy over the batch's flat token array, no per-token Python.

Labels: every token, unless some row has ``loss_start > 0`` (prompt tokens without loss); then the blocks carry a
``loss_mask`` (list of bool, one bit per token in Arrow).
"""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from zeda_lightning.data.dataset import _flat_values


def block_features(masked: bool) -> datasets.Features:
    features = {"input_ids": datasets.List(datasets.Value("int32")), "domain": datasets.Value("int32")}
    if masked:
        features["loss_mask"] = datasets.List(datasets.Value("bool"))
    return datasets.Features(features)


class _Packer:
    """Stateful map function: batches must come in order (one process)."""

    def __init__(self, max_length: int, masked: bool) -> None:
        self.n = max_length
        self.masked = masked
        self.domain: int | None = None
        self.carry = np.zeros(0, dtype=np.int32)
        self.carry_mask = np.zeros(0, dtype=bool)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = self.n
        flat, lengths = _flat_values(batch.column("input_ids"))
        flat = flat.astype(np.int32, copy=False)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if self.masked:
            start = batch.column("loss_start").to_numpy().astype(np.int64)
            row = np.repeat(np.arange(len(lengths)), lengths)
            keep = (np.arange(len(flat)) - offsets[row]) >= start[row]
        dom = batch.column("domain").to_numpy().astype(np.int64)
        cuts = np.flatnonzero(np.diff(dom)) + 1
        blocks, block_dom, masks = [], [], []
        for s, e in zip([0, *cuts.tolist()], [*cuts.tolist(), len(dom)]):  # one run per domain in this batch
            if dom[s] != self.domain:
                self.domain, self.carry, self.carry_mask = int(dom[s]), self.carry[:0], self.carry_mask[:0]
            stream = np.concatenate([self.carry, flat[offsets[s] : offsets[e]]])
            full = len(stream) // n * n
            blocks.append(stream[:full])
            block_dom.append(np.full(full // n, self.domain, dtype=np.int32))
            self.carry = stream[full:].copy()
            if self.masked:
                stream_mask = np.concatenate([self.carry_mask, keep[offsets[s] : offsets[e]]])
                masks.append(stream_mask[:full])
                self.carry_mask = stream_mask[full:].copy()
        values = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int32)
        count = len(values) // n
        block_offsets = pa.array(np.arange(0, count * n + 1, n, dtype=np.int32))
        out = {"input_ids": pa.ListArray.from_arrays(block_offsets, pa.array(values, type=pa.int32())),
               "domain": pa.array(np.concatenate(block_dom) if block_dom else np.zeros(0, np.int32), type=pa.int32())}
        if self.masked:
            mask = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
            out["loss_mask"] = pa.ListArray.from_arrays(block_offsets, pa.array(mask, type=pa.bool_()))
        return pa.table(out)


def pack_rows(rows: datasets.Dataset, max_length: int, cache_file_name: str, fingerprint: str) -> datasets.Dataset:
    """Packed blocks of encoded ``rows`` (columns of :mod:`zeda_lightning.data.encode`), written to
    ``cache_file_name``."""
    table = rows.data.table
    dom = table.column("domain").to_numpy().astype(np.int64)
    masked = bool(len(rows)) and int(pc.max(table.column("loss_start")).as_py()) > 0
    order = np.argsort(dom, kind="stable")
    ordered = rows.select(order, keep_in_memory=True) if len(rows) else rows
    return ordered.with_format("arrow").map(
        _Packer(max_length, masked), batched=True, batch_size=1000, remove_columns=rows.column_names,
        features=block_features(masked), cache_file_name=cache_file_name, new_fingerprint=fingerprint,
        load_from_cache_file=False, desc="Packing",
    )


__all__ = ["block_features", "pack_rows"]
