"""Static top-K' and top-p routing against hand computation."""

import math

import torch

from tests.helpers import one_hot_tokens, router_on_logits
from zeda_lightning import StaticTopK, TopP


def test_static_topk_pads_with_sentinel():
    real = torch.zeros(8, 32)
    real[4, 0], real[2, 0] = 2.0, 1.0
    router = router_on_logits("qwen3_moe", StaticTopK(k=1), real)
    _, weights, idx = router(one_hot_tokens(1))
    assert idx[0].tolist() == [4, 8]
    assert torch.equal(weights[0], torch.tensor([1.0, 0.0]))  # renorm over the K' = 1 slot


def test_top_p_cut_includes_crossing_expert():
    # token 0: top prob > p -> one expert; token 1: flat-ish -> two experts (max_k = K = 2)
    real = torch.zeros(8, 32)
    real[0, 0] = 5.0
    real[1, 1], real[6, 1] = 1.0, 0.9
    router = router_on_logits("qwen3_moe", TopP(p=0.4), real)
    _, weights, idx = router(one_hot_tokens(2))
    e = math.exp
    p0 = e(5) / (e(5) + 7)
    assert idx[0].tolist() == [0, 8] and torch.allclose(weights[0], torch.tensor([p0, 0.0]), atol=1e-6)
    z = e(1) + e(0.9) + 6
    assert idx[1].tolist() == [1, 6]
    assert torch.allclose(weights[1], torch.tensor([e(1) / z, e(0.9) / z]), atol=1e-6)  # raw probabilities
