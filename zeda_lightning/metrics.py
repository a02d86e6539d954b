"""Rank-synced metrics (torchmetrics state, reduced across processes): grouped ratios, and the held-out metric
collection of a distillation run. Inputs are tensors; the routing statistics come from ``zeda_lightning.analysis``."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from zeda_lightning.losses.kd import cross_entropy, token_kl


class GroupedRatio(Metric):
    """``sum(numerator_g) / sum(denominator_g)`` for G groups (layers, domains), synced by summing both.

    Used for zero-slot ratios: numerator = skipped slots, denominator = all slots, per layer or per domain.
    Groups that never saw data compute to NaN, and :meth:`seen` says which did.
    """

    full_state_update = False

    def __init__(self, num_groups: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_groups = num_groups
        self.add_state("numerator", default=torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("denominator", default=torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, numerator: Tensor, denominator: Tensor) -> None:  # both (G,)
        self.numerator += numerator.detach().to(self.numerator.device, torch.float64)
        self.denominator += denominator.detach().to(self.denominator.device, torch.float64)

    def update_by_group(self, numerator: Tensor, denominator: Tensor, groups: Tensor) -> None:
        """Per-item values (N,) summed into their groups (N,) (items with group < 0 are left out)."""
        keep = groups >= 0
        g = groups[keep].long().to(self.numerator.device)
        self.numerator.index_add_(0, g, numerator[keep].detach().to(self.numerator.device, torch.float64))
        self.denominator.index_add_(0, g, denominator[keep].detach().to(self.denominator.device, torch.float64))

    def compute(self) -> Tensor:
        return (self.numerator / self.denominator).float()  # (G,)

    def seen(self) -> Tensor:
        return self.denominator > 0

    def by_name(self, names: list[str]) -> dict[str, Tensor]:
        """``{name: ratio}`` of the groups that saw data (synced like :meth:`compute`).

        NOTE: torchmetrics squeezes a one-element result to 0-d (one MoE layer, one domain): kept 1-d here."""
        seen = self.seen().reshape(-1)
        return {name: v for name, v, ok in zip(names, self.compute().reshape(-1), seen) if ok}


class WeightedMean(Metric):
    """``sum(value_i * weight_i) / sum(weight_i)``, synced by summing both; a NaN or inf value propagates.

    (torchmetrics' ``MeanMetric`` drops NaN by default, and with ``nan_strategy="disable"`` it ignores the weights:
    an unweighted mean of batch means, which misweights a short last batch.)
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: Tensor | float = 1.0) -> None:
        value = torch.as_tensor(value).detach().to(self.total.device, torch.float64)
        weight = torch.as_tensor(weight).detach().to(self.weight.device, torch.float64)
        self.total += (value * weight).sum()
        self.weight += weight.sum() if weight.dim() else weight * max(value.numel(), 1)

    def compute(self) -> Tensor:
        return (self.total / self.weight).float()

    def seen(self) -> bool:
        return bool(self.weight > 0)


#: the scalar held-out metrics a distillation run logs, in order
DISTILL_SCALARS = ("nll", "teacher_nll", "kl_to_teacher", "top1_agreement", "zero_ratio", "real_experts_per_token")


class DistillMetrics(MetricCollection):
    """Held-out metrics of a distillation run, synced across processes by torchmetrics: the student's and the
    teacher's NLL, KL(teacher || student), top-1 agreement (each weighted by the batch's scored tokens), and the zero-slot share overall, per
    MoE layer and per domain (slot-weighted). ``real_experts_per_token`` is ``K (1 - zero_ratio)``: the same counts.

    A NaN is kept, not dropped: a diverged student must surface in the log and stop the run.
    """

    def __init__(self, layer_ids: list[int], domains: list[str], top_k: int) -> None:
        metrics = {name: WeightedMean() for name in DISTILL_SCALARS[:4]}
        metrics["zero_ratio"] = GroupedRatio(1)
        metrics["zero_by_layer"] = GroupedRatio(len(layer_ids))
        metrics["zero_by_domain"] = GroupedRatio(max(len(domains), 1))
        super().__init__(metrics, compute_groups=False)
        self.layer_ids, self.domains, self.top_k = list(layer_ids), list(domains), top_k

    @torch.no_grad()
    def update(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, skipped: Tensor,
               slots: Tensor) -> None:
        """``student_logits`` / ``teacher_logits`` (B, S, V), ``labels`` (B, S) (-100: not scored), ``skipped`` and
        ``slots`` (G, L): skipped and all (token, slot) pairs per domain and layer (one group when no domains)."""
        y = labels[:, 1:]
        mask = y != -100  # (B, S-1)
        n_tok = mask.sum()
        if n_tok > 0:
            s = torch.log_softmax(student_logits[:, :-1].float(), -1)
            t = torch.log_softmax(teacher_logits[:, :-1].float(), -1)
            self["nll"].update(cross_entropy(student_logits[:, :-1], y), n_tok)
            self["teacher_nll"].update(cross_entropy(teacher_logits[:, :-1], y), n_tok)
            self["kl_to_teacher"].update(token_kl(t, s)[mask].mean(), n_tok)
            self["top1_agreement"].update((s.argmax(-1) == t.argmax(-1))[mask].float().mean(), n_tok)
        if bool(slots.sum() > 0):
            self["zero_ratio"].update(skipped.sum().reshape(1), slots.sum().reshape(1))
            self["zero_by_layer"].update(skipped.sum(0), slots.sum(0))
            if self.domains:
                self["zero_by_domain"].update(skipped.sum(1), slots.sum(1))

    def results(self) -> dict[str, Tensor]:
        """``{name: value}`` for everything seen: the scalars, ``zero_ratio/layer_{i}`` and ``zero_ratio/{domain}``."""
        out = {name: self[name].compute() for name in DISTILL_SCALARS[:4] if self[name].update_count}  # token-weighted
        if bool(self["zero_ratio"].seen().any()):
            total = self["zero_ratio"].compute().reshape(())  # synced over processes, like every compute()
            out["zero_ratio"] = total
            out["real_experts_per_token"] = self.top_k * (1 - total)
            # NOTE: torchmetrics squeezes a one-element result to 0-d (one MoE layer, one domain): keep it 1-d
            for layer, v in zip(self.layer_ids, self["zero_by_layer"].compute().reshape(-1)):
                out[f"zero_ratio/layer_{layer}"] = v
        if self.domains:
            out.update({f"zero_ratio/{name}": v for name, v in self["zero_by_domain"].by_name(self.domains).items()})
        return out
