"""Each family's router scoring rule, written once for a pool of any size.

Pool layout: columns ``[0, N)`` are the real experts, ``[N, P)`` are extra slots (zero or null experts). With
``P == N`` every method runs the family's original op sequence, so the original router's output is reproduced bit
for bit; that is what makes ``mask_zero`` and ``rho = 1`` exact.

Shapes: T tokens, H hidden, N real experts, P pool size (N + extra), k slots chosen.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from zeda_lightning.losses.routing import router_probs


class RouterScoring(ABC):
    """Turns hidden states into logits, picks k slots, and turns the picked scores into combine weights."""

    #: How the aux losses turn logits into a distribution over the pool: "softmax" or "sigmoid".
    score_func: str = "softmax"

    @classmethod
    def from_router(cls, router) -> RouterScoring:
        """The rule with the settings an original router instance carries."""
        return cls()

    def logits(self, h: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.linear(h, weight, bias)  # (T, P)

    def weights_dtype(self, h: Tensor, logits: Tensor) -> torch.dtype:
        """The dtype the original router casts its combine weights to (most families: its logits')."""
        return logits.dtype

    def pool_logits(self, h: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """Logits over an extended pool (real + zero / null slots) in fp32 with autocast off, as the ZEDA code
        trains its router: top-K over N + N_Z logits rounded to bf16 ties often, and the aux losses want fp32
        probabilities. Masked routers keep the family's own :meth:`logits` (bit-identical to the original)."""
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), weight.float(), None if bias is None else bias.float())  # (T, P) fp32

    @abstractmethod
    def select(
        self, logits: Tensor, num_real: int, k: int, correction_bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return ``(indices (T, k), picked scores (T, k))``; group limits and bias apply to real experts only."""

    @abstractmethod
    def combine(self, top_scores: Tensor, logits_dtype: torch.dtype, norm_mask: Tensor | None = None) -> Tensor:
        """Combine weights ``(T, k)``.

        ``norm_mask=None``: the family's own rule over all k slots (ZEDA: zero slots included in the denominator).
        A mask: normalise over the masked slots only, always (null experts: renormalise over real experts).
        """

    def gather_scores(self, logits: Tensor, indices: Tensor) -> Tensor:
        """The scores :meth:`select` would return for the given ``indices`` (routing replay)."""
        return torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1).gather(1, indices)

    def probs(self, logits: Tensor) -> Tensor:
        """A distribution over the pool, for thresholds (top-p); same rule as the aux losses use."""
        return router_probs(logits, self.score_func)


def _masked_ratio(values: Tensor, mask: Tensor) -> Tensor:
    values = values.masked_fill(~mask, 0.0)
    denom = values.sum(dim=-1, keepdim=True)
    # NOTE: a token whose slots are all masked keeps weight 0 (0 / 1), never 0 / 0.
    return values / torch.where(denom > 0, denom, torch.ones_like(denom))


class SoftmaxTopKScoring(RouterScoring):
    """Qwen2/3-MoE, OLMoE, Qwen3-Next, Mixtral: softmax over the pool, top-k, optional renorm over the k slots."""

    score_func = "softmax"

    def __init__(self, norm_topk_prob: bool, cast_weights: bool = True) -> None:
        self.norm_topk_prob = norm_topk_prob
        # Qwen casts the fp32 weights back to the logits dtype; Mixtral keeps them in fp32.
        self.cast_weights = cast_weights

    @classmethod
    def from_router(cls, router) -> SoftmaxTopKScoring:
        return cls(norm_topk_prob=router.norm_topk_prob)


    def select(self, logits, num_real, k, correction_bias=None):
        router_probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)  # (T, P)
        top_value, indices = torch.topk(router_probs, k, dim=-1)  # (T, k)
        return indices, top_value

    def combine(self, top_scores, logits_dtype, norm_mask=None):
        if norm_mask is not None:
            weights = _masked_ratio(top_scores, norm_mask)
        elif self.norm_topk_prob:
            weights = top_scores / top_scores.sum(dim=-1, keepdim=True)
        else:
            weights = top_scores
        return weights.to(logits_dtype) if self.cast_weights else weights


class MixtralScoring(SoftmaxTopKScoring):
    """Mixtral: always renormalised over the k slots, weights kept in fp32."""

    @classmethod
    def from_router(cls, router) -> MixtralScoring:
        return cls(norm_topk_prob=True, cast_weights=False)


class HunYuanScoring(SoftmaxTopKScoring):
    """HunYuan-MoE-V1: logits in fp32 when the router weight is fp32 (as the checkpoint keeps it), else in the
    weight's dtype; softmax top-k always renormalised, weights cast back to the logits' dtype."""

    @classmethod
    def from_router(cls, router) -> HunYuanScoring:
        return cls(norm_topk_prob=True)

    def logits(self, h, weight, bias=None):
        return F.linear(h.float() if weight.dtype == torch.float32 else h, weight)  # (T, P)


class SoftmaxBiasScoring(RouterScoring):
    """ERNIE-4.5-MoE: fp32 logits with autocast off; softmax; top-k on ``softmax + e_score_correction_bias``; the
    unbiased probabilities renormalised with the sum clamped at ``moe_norm_min``, cast to the hidden states' dtype."""

    score_func = "softmax"

    def __init__(self, norm_min: float) -> None:
        self.norm_min = norm_min

    @classmethod
    def from_router(cls, router) -> SoftmaxBiasScoring:
        return cls(router.norm_min)

    def logits(self, h, weight, bias=None):
        return self.pool_logits(h, weight)  # (T, P) fp32, autocast off: the original's op sequence

    def weights_dtype(self, h, logits):
        return h.dtype

    def select(self, logits, num_real, k, correction_bias=None):
        probs = torch.nn.functional.softmax(logits, dim=1, dtype=torch.float)  # (T, P)
        for_choice = probs + correction_bias if correction_bias is not None else probs
        indices = torch.topk(for_choice, k, dim=-1)[1]  # (T, k)
        return indices, probs.gather(-1, indices)

    def combine(self, top_scores, logits_dtype, norm_mask=None):
        weights = top_scores if norm_mask is None else top_scores.masked_fill(~norm_mask, 0.0)
        weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=self.norm_min)
        return weights.to(logits_dtype)


class SigmoidGroupScoring(RouterScoring):
    """DeepSeek-V3, GLM-4.5/4.6 (glm4_moe), GLM-4.7-Flash (glm4_moe_lite).

    fp32 logits; sigmoid scores; selection on ``scores + e_score_correction_bias`` limited to the best ``topk_group``
    of ``n_group`` groups; weights are the unbiased scores renormalised over the k slots (+1e-20), times
    ``routed_scaling_factor``.
    """

    score_func = "sigmoid"
    #: added to the renormalisation's denominator
    norm_eps = 1e-20

    def __init__(self, n_group: int, topk_group: int, routed_scaling_factor: float, norm_topk_prob: bool) -> None:
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.norm_topk_prob = norm_topk_prob

    @classmethod
    def from_router(cls, router) -> SigmoidGroupScoring:
        return cls(router.num_group, router.topk_group, router.routed_scaling_factor, router.norm_topk_prob)

    def logits(self, h, weight, bias=None):
        return F.linear(h.type(torch.float32), weight.type(torch.float32))  # (T, P) fp32

    def select(self, logits, num_real, k, correction_bias=None):
        scores = logits.sigmoid()  # (T, P)
        scores_for_choice = scores + correction_bias if correction_bias is not None else scores
        real = scores_for_choice[:, :num_real]  # (T, N)
        # NOTE: groups are formed over the real experts exactly as in the original model; the extra slots stay
        # outside every group and are always eligible (the ZEDA code groups over all N + N_Z ids instead, which
        # changes group membership of the real experts whenever n_group > 1).
        group_scores = real.view(-1, self.n_group, num_real // self.n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1).expand(-1, self.n_group, num_real // self.n_group).reshape(-1, num_real)
        )
        real = real.masked_fill(~score_mask.bool(), float("-inf"))
        if scores_for_choice.shape[1] > num_real:
            scores_for_choice = torch.cat([real, scores_for_choice[:, num_real:]], dim=-1)  # (T, P)
        else:
            scores_for_choice = real
        indices = torch.topk(scores_for_choice, k=k, dim=-1, sorted=False)[1]  # (T, k)
        return indices, scores.gather(1, indices)

    def gather_scores(self, logits, indices):
        return logits.sigmoid().gather(1, indices)

    def combine(self, top_scores, logits_dtype, norm_mask=None):
        weights = top_scores
        if norm_mask is not None:
            weights = weights.masked_fill(~norm_mask, 0.0)
        if self.norm_topk_prob or norm_mask is not None:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.norm_eps)
        return weights * self.routed_scaling_factor


class SigmoidTopKScoring(SigmoidGroupScoring):
    """LFM2-MoE: DeepSeek-V3's combine without groups: sigmoid of the logits in their own dtype, top-k (sorted) on
    ``scores + expert_bias`` (the bias the block owns), the unbiased scores renormalised (+1e-6) when
    ``norm_topk_prob``, times ``routed_scaling_factor``."""

    norm_eps = 1e-6
    logits = RouterScoring.logits

    def __init__(self, routed_scaling_factor: float, norm_topk_prob: bool) -> None:
        super().__init__(1, 1, routed_scaling_factor, norm_topk_prob)

    @classmethod
    def from_router(cls, router) -> SigmoidTopKScoring:
        return cls(router.routed_scaling_factor, router.norm_topk_prob)

    def select(self, logits, num_real, k, correction_bias=None):
        scores = logits.sigmoid()  # (T, P)
        if correction_bias is None:
            top_scores, indices = torch.topk(scores, k, dim=-1)  # (T, k)
            return indices, top_scores
        indices = torch.topk(scores + correction_bias, k, dim=-1)[1]  # (T, k)
        return indices, scores.gather(1, indices)


class LogitTopKSoftmaxScoring(RouterScoring):
    """GPT-OSS: biased logits, top-k on the logits, softmax over the k picked logits."""

    score_func = "softmax"

    def select(self, logits, num_real, k, correction_bias=None):
        top_value, indices = torch.topk(logits, k, dim=-1)  # (T, k)
        return indices, top_value

    def gather_scores(self, logits, indices):
        return logits.gather(1, indices)

    def combine(self, top_scores, logits_dtype, norm_mask=None):
        if norm_mask is None:
            return torch.nn.functional.softmax(top_scores, dim=1, dtype=top_scores.dtype)
        weights = torch.nn.functional.softmax(top_scores.masked_fill(~norm_mask, float("-inf")), dim=1)
        return torch.nan_to_num(weights, nan=0.0)  # all slots masked: softmax of -inf row is NaN -> 0


class GraniteMoeScoring(LogitTopKSoftmaxScoring):
    """GraniteMoE: bias-free logits, top-k on the logits taken in fp32, softmax over the k picked logits in fp32,
    weights cast back to the logits' dtype (the original's ``type_as(hidden_states)``)."""

    def select(self, logits, num_real, k, correction_bias=None):
        top_value, indices = logits.float().topk(k, dim=-1)  # (T, k) fp32
        return indices, top_value

    def gather_scores(self, logits, indices):
        return logits.float().gather(1, indices)

    def combine(self, top_scores, logits_dtype, norm_mask=None):
        return super().combine(top_scores, logits_dtype, norm_mask).to(logits_dtype)


def compute_dtype(h: Tensor) -> torch.dtype:
    """The dtype the original router's logits would have for input ``h``: autocast's when it is on, else ``h``'s.
    Combine weights are cast to it, so the experts see what the original model gives them."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype
