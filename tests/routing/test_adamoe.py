"""AdaMoE: independent null logits under their own registry name."""

import math

import torch

from tests.helpers import one_hot_tokens, router_on_logits
from zeda_lightning.routing import AdaMoE, NullExperts, get_routing, routing_from_config


def test_independent_null_logits_hand_computation():
    real = torch.zeros(8, 32)
    real[1, 0], real[4, 0] = 1.0, 0.5
    router = router_on_logits("qwen3_moe", AdaMoE(rho=0.5), real)
    assert router.null_weight.shape == (8, 32)  # M = 8 separate null rows
    with torch.no_grad():
        router.null_weight.zero_()
        router.null_weight[3, 0] = 0.8  # null 3 beats expert 4, the other nulls (0) do not
    logits, weights, idx = router(one_hot_tokens(1))
    assert logits.shape == (1, 16) and logits[0, 8 + 3] == 0.8 and logits[0, 8] == 0.0
    assert idx[0].tolist() == [1, 8]  # expert 1 and null 3 (sentinel)
    assert torch.allclose(weights[0], torch.tensor([1.0, 0.0]))  # renorm over the real expert only
    with torch.no_grad():
        router.null_weight[3, 0] = -1.0
    _, weights, idx = router(one_hot_tokens(1))
    e = math.exp
    assert idx[0].tolist() == [1, 4]
    assert torch.allclose(weights[0], torch.tensor([e(1.0) / (e(1.0) + e(0.5)), e(0.5) / (e(1.0) + e(0.5))]), atol=1e-6)


def test_registry_and_config_round_trip():
    variant = get_routing("adamoe", rho=0.6, seed=2)
    assert isinstance(variant, NullExperts) and variant.independent
    assert variant.to_config()["init_args"] == {"rho": 0.6, "seed": 2}
    again = routing_from_config(variant.to_config())
    assert type(again) is AdaMoE and again.rho == 0.6
