"""``Collator``: padded, masked batches from token rows, with tensor ops over the whole batch.

A batch arrives as a :class:`TokenBatch` (columns gathered from the Arrow table in one ``take``: the flat token ids
of every row, their lengths, and where each row's loss starts) or, from code that hands rows over itself, as a list
of row dicts (``input_ids``, ``labels``, ``domain``, optionally ``prompt_len``). Either way the output is

    input_ids       (B, W) long, right-padded with the pad id
    attention_mask  (B, W) long, 1 on tokens
    labels          (B, W) long, IGNORE_INDEX (-100) on padding and on tokens without loss (prompts)
    domain          (B,)   long, index into ``ZedaDataModule.domains`` (-1: none)
    prompt_ids      (B, P) long, left-padded prompts (first ``prompt_len`` tokens of each row), ``prompts`` only
    prompt_mask     (B, P) long
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class TokenBatch:
    """Rows as flat columns: ``ids`` holds the rows' tokens back to back (row ``i`` has ``lengths[i]``)."""

    ids: torch.Tensor  # (sum(lengths),) int
    lengths: torch.Tensor  # (B,) long
    domain: torch.Tensor  # (B,) long
    loss_start: torch.Tensor | None = None  # (B,) long: tokens before it carry no loss
    loss_mask: torch.Tensor | None = None  # (sum(lengths),) bool: which tokens carry loss (packed blocks)
    labels: torch.Tensor | None = None  # (sum(lengths),) long, explicit labels (rows handed over as dicts)
    prompt_len: torch.Tensor | None = None  # (B,) long


def _flat(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
    if not values:
        return torch.zeros(0, dtype=dtype)
    return torch.cat([torch.as_tensor(v, dtype=dtype).reshape(-1) for v in values])


def rows_to_batch(rows: list[dict[str, Any]]) -> TokenBatch:
    """A list of row dicts as one :class:`TokenBatch` (one tensor per row, no per-token work)."""
    lengths = torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.long)
    has_prompt = bool(rows) and all(r.get("prompt_len") is not None for r in rows)
    return TokenBatch(
        ids=_flat([r["input_ids"] for r in rows], torch.long),
        lengths=lengths,
        domain=torch.tensor([int(r["domain"]) for r in rows], dtype=torch.long),
        labels=_flat([r["labels"] for r in rows], torch.long),
        prompt_len=torch.tensor([int(r["prompt_len"]) for r in rows], dtype=torch.long) if has_prompt else None,
    )


class Collator:
    """Picklable collate function (DataLoader workers get this, not the data module)."""

    def __init__(self, pad_id: int, prompts: bool = False) -> None:
        self.pad_id = int(pad_id)
        self.prompts = prompts

    def __call__(self, batch: TokenBatch | list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not isinstance(batch, TokenBatch):
            batch = rows_to_batch(list(batch))
        lengths = batch.lengths
        n = len(lengths)
        width = int(lengths.max()) if n else 0
        pos = torch.arange(width).expand(n, width)
        mask = pos < lengths[:, None]
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        input_ids[mask] = batch.ids.long()  # row-major order of the mask = the rows back to back
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        if batch.labels is not None:
            labels[mask] = batch.labels.long()
        elif batch.loss_mask is not None:
            labels[mask] = torch.where(batch.loss_mask, batch.ids.long(), IGNORE_INDEX)
        else:
            start = batch.loss_start if batch.loss_start is not None else torch.zeros(n, dtype=torch.long)
            keep = mask & (pos >= start[:, None])
            labels[keep] = input_ids[keep]
        out = {"input_ids": input_ids, "attention_mask": mask.long(), "labels": labels, "domain": batch.domain.long()}
        if self.prompts:  # left-padded prompts, as decoder-only generation wants them
            plen = batch.prompt_len if batch.prompt_len is not None else lengths
            width_p = int(plen.max()) if n else 0
            src = torch.arange(width_p)[None, :] - (width_p - plen)[:, None]  # column j holds token j - (P - len)
            valid = src >= 0
            gathered = input_ids.gather(1, src.clamp(min=0)) if width else torch.zeros((n, width_p), dtype=torch.long)
            out["prompt_ids"] = torch.where(valid, gathered, self.pad_id)
            out["prompt_mask"] = valid.long()
        return out


__all__ = ["IGNORE_INDEX", "Collator", "TokenBatch", "rows_to_batch"]
