"""Where the skipped compute falls: realised expert-FLOP bookkeeping, zero share per domain x layer, real experts
per token, and a token-level view. Works on any injected model through ``capture_routing`` records.

Bookkeeping counts realised slots: a (token, slot) pair costs one expert FFN iff it reached a real expert, so the
realised expert-FLOP fraction is ``kept slots / (valid tokens x K x layers)`` (every expert has the same size).
Sentinel slots of every kind count as skipped: zero / null experts, MoE++ copy and constant experts (no GEMM),
top-p cut-offs and static top-K' padding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zeda_lightning.routing import RouterOutput, capture_routing


def stacked_skips(records: dict[int, RouterOutput]) -> Tensor:
    """``(L, T, K)`` bool skipped mask, layers in ascending order."""
    return torch.stack([records[i].skipped for i in sorted(records)])


def zero_ratio(records: dict[int, RouterOutput] | Iterable[RouterOutput], token_mask: Tensor | None = None) -> Tensor:
    """Share of skipped (token, slot) pairs over every layer's valid tokens, as a 0-d float32 tensor (0 when there is
    no valid token). The one definition of "zero ratio" the training logs, metrics, benches and commands use."""
    recs = list(records.values()) if isinstance(records, dict) else list(records)
    skipped = torch.stack([r.skipped for r in recs])  # (L, T, K)
    if token_mask is not None:
        skipped = skipped[:, token_mask.reshape(-1).bool()]
    return skipped.float().mean() if skipped.numel() else skipped.new_zeros((), dtype=torch.float32)


def expert_flop_fraction(skipped: Tensor, token_mask: Tensor | None = None) -> float:
    """Realised routed-expert FLOPs over the unmodified model's, from ``skipped`` (L, T, K) and ``token_mask`` (T,)."""
    if token_mask is not None:
        skipped = skipped[:, token_mask.reshape(-1).bool()]
    if skipped.numel() == 0:
        raise ValueError("expert_flop_fraction: no valid token to count; check the token mask")
    return float((~skipped).sum()) / skipped.numel()


def real_experts_histogram(skipped: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """``(K + 1,)`` counts of (layer, token) pairs by how many real experts they ran (0..K)."""
    if token_mask is not None:
        skipped = skipped[:, token_mask.reshape(-1).bool()]
    k = skipped.shape[-1]
    return torch.bincount((~skipped).sum(-1).reshape(-1), minlength=k + 1)


def skipped_by_group(skipped: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Skipped slots and all slots per (group, layer): two ``(G, L)`` tensors; tokens with group < 0 are left out."""
    num_layers, _, k = skipped.shape
    keep = groups >= 0  # (T,)
    per_tok = skipped[:, keep].sum(-1).T.double()  # (T', L)
    g = groups[keep]
    num = per_tok.new_zeros(num_groups, num_layers).index_add_(0, g, per_tok)
    den = per_tok.new_zeros(num_groups, num_layers).index_add_(0, g, torch.full_like(per_tok, k))
    return num, den


def slot_counts(records: dict[int, RouterOutput], attention_mask: Tensor, seq_group: Tensor | None = None,
                num_groups: int = 1) -> tuple[Tensor, Tensor]:
    """Skipped and all (token, slot) pairs per (group, layer) of one forward: two ``(G, L)`` tensors, layers in
    ascending order. ``attention_mask`` (B, S) picks the valid tokens; ``seq_group`` (B,) a group per sequence
    (a domain; < 0 = none), or one group for all."""
    valid = attention_mask.reshape(attention_mask.shape[0], -1).bool()  # (B, S)
    groups = torch.zeros_like(valid, dtype=torch.long) if seq_group is None else seq_group.long()[:, None].expand_as(valid)
    return skipped_by_group(stacked_skips(records), groups.masked_fill(~valid, -1).reshape(-1), num_groups)


@dataclass
class RoutingTally:
    """Accumulates routing statistics over batches (single process)."""

    num_domains: int
    skipped_slots: float = 0.0
    slots: float = 0.0
    histogram: Tensor | None = None
    by_domain_num: Tensor | None = None
    by_domain_den: Tensor | None = None

    def update(self, records: dict[int, RouterOutput], token_mask: Tensor, token_domain: Tensor) -> None:
        skipped = stacked_skips(records).cpu()  # (L, T, K)
        mask = token_mask.reshape(-1).bool().cpu()
        valid = skipped[:, mask]
        self.skipped_slots += float(valid.sum())
        self.slots += valid.numel()
        hist = real_experts_histogram(skipped, mask)
        self.histogram = hist if self.histogram is None else self.histogram + hist
        dom = token_domain.reshape(-1).cpu().masked_fill(~mask, -1)
        num, den = skipped_by_group(skipped, dom, max(self.num_domains, 1))
        self.by_domain_num = num if self.by_domain_num is None else self.by_domain_num + num
        self.by_domain_den = den if self.by_domain_den is None else self.by_domain_den + den

    def report(self, domains: list[str], layers: list[int]) -> dict:
        share = (self.by_domain_num / self.by_domain_den.clamp_min(1)).tolist()
        hist = self.histogram.double()
        return {
            "zero_ratio": self.skipped_slots / self.slots,
            "expert_flop_fraction": 1.0 - self.skipped_slots / self.slots,
            "real_experts_histogram": (hist / hist.sum()).tolist(),  # share of (layer, token) pairs with 0..K
            "layers": layers,
            "domains": domains,
            "zero_ratio_domain_layer": {d: share[i] for i, d in enumerate(domains)},
        }


@torch.no_grad()
def routing_report(model: nn.Module, batches: Iterable[dict[str, Tensor]], domains: list[str]) -> dict:
    """Run ``model`` (eval mode) over ``batches`` (``input_ids``, ``attention_mask``, ``domain`` per sequence) and
    return the realised zero ratio / expert-FLOP fraction, the real-experts-per-token histogram and the zero share
    per domain x layer."""
    was_training = model.training
    model.eval()
    tally, layers = RoutingTally(len(domains)), None
    try:
        for batch in batches:
            with capture_routing(model) as records:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            layers = sorted(records)
            seq_domain = batch.get("domain", torch.full((batch["input_ids"].shape[0],), -1))
            token_domain = seq_domain[:, None].expand_as(batch["input_ids"])  # (B, S)
            tally.update(records, batch["attention_mask"], token_domain)
    finally:
        model.train(was_training)
    if layers is None:
        raise ValueError("routing_report: no batch given")
    return tally.report(domains, layers)


@torch.no_grad()
def token_view(model: nn.Module, tokenizer, text: str) -> list[tuple[str, float]]:
    """``(token text, real experts per layer averaged over layers)`` for each token of ``text``."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, S)
    was_training = model.training
    model.eval()
    try:
        with capture_routing(model) as records:
            model(input_ids=ids)
    finally:
        model.train(was_training)
    skipped = stacked_skips(records)  # (L, S, K)
    real = (~skipped).sum(-1).float().mean(0)  # (S,)
    pieces = [tokenizer.decode([int(i)]) for i in ids[0]]
    return list(zip(pieces, real.tolist()))
