"""Adaptive-K: k per token from the routing entropy against hand computation, each token routed as the family's own
top-k, exact at k = K, skipped compute, and config round trips."""

import math

import pytest
import torch

from tests.helpers import ExpertRowCounter, one_hot_tokens, router_on_logits, single_thread  # noqa: F401
from zeda_lightning.adapters import adapter_for, inject
from zeda_lightning.routing import (AdaptiveK, StaticTopK, capture_routing, get_routing, iter_routers,
                                    routing_from_config)
from zeda_lightning.routing.adaptive_k import even_thresholds, k_per_token, routing_entropy
from zeda_lightning.tiny import tiny_model

N, H = 8, 32


def _entropy(row):
    z = sum(math.exp(x) for x in row)
    return -sum(math.exp(x) / z * math.log(math.exp(x) / z) for x in row)


def test_k_per_token_counts_the_thresholds_below_the_entropy():
    entropy = torch.tensor([0.1, 0.5, 0.9, 1.0, 1.5])
    k = k_per_token(entropy, torch.tensor([0.5, 1.0]), torch.tensor([1, 2, 4]))
    assert k.tolist() == [1, 2, 2, 4, 4]  # H < h_1: 1; h_1 <= H < h_2: 2; H >= h_2: 4
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(routing_entropy(probs), torch.tensor([math.log(2), 0.0]))  # 0 ln 0 = 0
    assert even_thresholds(1.0, 4) == [0.25, 0.5, 0.75] and even_thresholds(2.0, 2) == [1.0]


def test_hand_built_distribution_gets_the_right_k_and_the_static_top_k_weights():
    # token 0 peaked (k = 1), token 1 flat (k = K = 2), token 2 two strong experts (entropy in between)
    real = torch.zeros(N, H)
    real[3, 0] = 6.0
    real[1, 2], real[6, 2] = 3.0, 2.5
    logits = real[:, :3].T.tolist()
    ent = [_entropy(r) for r in logits]
    assert ent[0] < ent[2] < ent[1] == pytest.approx(math.log(N))
    h = (ent[0] + ent[2]) / 2 / math.log(N)  # one threshold between tokens 0 and 2, as a fraction of ln N
    router = router_on_logits("qwen3_moe", AdaptiveK(thresholds=[h]), real)
    assert router.token_k(router.scoring.logits(one_hot_tokens(3), router.weight)).tolist() == [1, 2, 2]
    _, weights, idx = router(one_hot_tokens(3))
    static = router_on_logits("qwen3_moe", StaticTopK(k=1), real)
    _, w1, i1 = static(one_hot_tokens(3))
    assert idx[0].tolist() == [3, N] and torch.equal(weights[0], w1[0]) and weights[0, 0] == 1.0  # renorm over k = 1
    e = math.exp
    assert idx[2].tolist() == [1, 6]
    assert torch.allclose(weights[2], torch.tensor([e(3) / (e(3) + e(2.5)), e(2.5) / (e(3) + e(2.5))]), atol=1e-6)
    assert (idx[1] < N).all()


def test_sigmoid_family_token_at_k_1_routes_as_static_top_1():
    real = torch.zeros(N, H)
    real[2, 0], real[5, 0] = 4.0, 1.0  # token 0: peaked sigmoid scores
    router = router_on_logits("glm4_moe_lite", AdaptiveK(thresholds=[1.0]), real)  # every token below ln N: k = 1
    static = router_on_logits("glm4_moe_lite", StaticTopK(k=1), real)
    got, want = router(one_hot_tokens(4)), static(one_hot_tokens(4))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert math.isclose(got[1][0, 0].item(), 1.8, rel_tol=1e-6)  # renormalised over 1 slot, times the scaling


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe_lite", "gpt_oss"])
def test_every_token_at_k_K_is_the_original_model(family):
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = tiny_model(family)(ids).logits
        out = inject(tiny_model(family), AdaptiveK(thresholds=[0.0]))(ids).logits  # H >= 0: k = K everywhere
    assert torch.equal(out, ref)


def test_k_per_token_in_a_model_matches_the_entropy_of_its_own_logits_and_skips_compute():
    torch.manual_seed(0)
    model = inject(tiny_model("qwen3_moe", num_experts_per_tok=4), AdaptiveK(k_values=[1, 2, 4], thresholds=[0, 0]))
    block = model.model.layers[0].mlp
    h = torch.randn(64, H) * 20  # spread the entropies
    with torch.no_grad():
        ent = routing_entropy(torch.softmax(h @ block.gate.weight.T, -1))  # (T,) from the router rows by hand
        cuts = (ent.quantile(torch.tensor([0.3, 0.7])) / math.log(N)).tolist()
        block.gate.set_thresholds(cuts)
        with capture_routing(model) as rec:
            _, w, idx = block.gate(h)
        with ExpertRowCounter() as counter:
            block.experts(h, idx, w)
    want = torch.where(ent < cuts[0] * math.log(N), 1, torch.where(ent < cuts[1] * math.log(N), 2, 4))
    assert torch.equal((~rec[0].skipped).sum(-1), want)
    assert set(want.tolist()) == {1, 2, 4}  # the check covers every level
    assert counter.rows == 2 * int(want.sum())  # up + down rows of the kept slots only


def test_config_round_trip_validation_and_reload(tmp_path):
    from zeda_lightning.export import export_model, from_pretrained

    variant = get_routing("adaptive_k", thresholds=[0.3, 0.6, 0.8])
    again = routing_from_config(variant.to_config())
    assert again.init_args() == {"thresholds": [0.3, 0.6, 0.8], "k_values": None}
    model = inject(tiny_model("qwen3_moe", num_experts_per_tok=4), variant)
    export_model(model, str(tmp_path / "m"))
    loaded = from_pretrained(str(tmp_path / "m"))
    assert [r.thresholds for r in iter_routers(loaded)] == [[0.3, 0.6, 0.8]] * 2
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    dims = adapter_for(tiny_model("qwen3_moe")).dims(tiny_model("qwen3_moe").model.layers[0].mlp.gate)
    with pytest.raises(ValueError, match="need 1 thresholds"):
        AdaptiveK(thresholds=[0.2, 0.4]).validate(dims)
    with pytest.raises(ValueError, match="exceed the model's top-k"):
        AdaptiveK(k_values=[1, 4], thresholds=[0.5]).validate(dims)
    with pytest.raises(ValueError, match="ascending"):
        AdaptiveK(thresholds=[0.6, 0.3])
