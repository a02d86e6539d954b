"""MoE++: zero / copy / constant experts against hand computation, gating residual, exact masking, round trip."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ExpertRowCounter, one_hot_tokens, router_on_logits
from zeda_lightning import capture_routing, inject, set_zero_mask
from zeda_lightning.routing import MoEPlusPlus, get_routing, routing_from_config
from zeda_lightning.tiny import tiny_model

N, K, H = 8, 2, 32  # tiny qwen3_moe: 8 experts, top-2, hidden 32


def _expert(experts, e, x):
    """One Qwen3 expert FFN written out: down(silu(gate x) * up x)."""
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ experts.down_proj[e].T


def test_pool_layout_and_sentinels():
    # pool: 0..7 real, 8 zero, 9 copy, 10 constant
    rows = torch.zeros(N + 3, H)
    rows[3, 0], rows[9, 0] = 2.0, 1.5  # token 0: real expert 3 and the copy expert
    rows[8, 1], rows[10, 1] = 3.0, 2.5  # token 1: the zero and the constant expert
    router = router_on_logits("qwen3_moe", MoEPlusPlus(num_zero=1, num_copy=1, num_constant=1), rows)
    logits, weights, idx = router(one_hot_tokens(2))
    assert logits.shape == (2, N + 3)
    assert idx[0].tolist() == [3, N] and idx[1].tolist() == [N, N]  # every zero-computation slot is a sentinel
    p = torch.softmax(logits[0], -1)
    assert torch.allclose(weights[0], torch.stack([p[3] / (p[3] + p[9]), torch.tensor(0.0)]), atol=1e-6)
    assert torch.equal(weights[1], torch.zeros(2))


def test_block_output_matches_hand_computation():
    model = inject(tiny_model("qwen3_moe"), MoEPlusPlus(num_zero=1, num_copy=1, num_constant=2, seed=0))
    block = model.model.layers[0].mlp
    router, experts = block.gate, block.experts
    with torch.no_grad():
        router.const_gate.normal_()
        router.const_vectors.normal_()
        router.weight[N:] += 1.5  # make zero-computation experts common
    x = torch.randn(1, 24, H)
    with torch.no_grad():
        out = block(x).reshape(24, H)
        h = x.reshape(24, H)
        p = torch.softmax(h @ router.weight.T, -1)  # (T, P)
        top, ids = p.topk(K, -1)
        w = top / top.sum(-1, keepdim=True)  # norm_topk_prob: renorm over the K slots, zero-computation included
        ref = torch.zeros_like(h)
        kinds = set()
        for t in range(24):
            for s in range(K):
                e, ws = int(ids[t, s]), w[t, s]
                if e < N:
                    ref[t] += ws * _expert(experts, e, h[t])
                elif e == N:
                    kinds.add("zero")
                elif e == N + 1:
                    kinds.add("copy")
                    ref[t] += ws * h[t]
                else:
                    kinds.add("constant")
                    c = e - N - 2
                    a = torch.softmax(router.const_gate[c] @ h[t], -1)
                    ref[t] += ws * (a[0] * h[t] + a[1] * router.const_vectors[c])
    assert kinds == {"zero", "copy", "constant"}  # the check covers every kind
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_zero_computation_slots_cost_no_expert_rows(impl):
    model = inject(tiny_model("qwen3_moe"), MoEPlusPlus(num_zero=1, num_copy=1, num_constant=1, seed=0))
    model.set_experts_implementation(impl)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.gate.weight[N + 1 :] += 2.0  # copy and constant experts win many slots
    h = torch.randn(16, H)
    with torch.no_grad():
        _, w, idx = block.gate(h)  # hands the copy / constant outputs to the experts' hook
        with ExpertRowCounter() as counter:
            out = block.experts(h, idx, w)
        # reference: the same call with only the real slots, plus the zero-GEMM outputs computed apart
        real = idx < N
        pool_ids, pool_w = _pool_routing(block.gate, h)
        extra = block.gate.zero_gemm_output(h, pool_ids, pool_w)
        dense = block.experts(h, idx.masked_fill(~real, 0), w.masked_fill(~real, 0.0))
    kept = int(real.sum())
    assert 0 < kept < 16 * K and counter.rows == 2 * kept  # up + down rows of the real slots only
    assert torch.allclose(out, dense + extra, atol=1e-5)


def _pool_routing(router, h):
    """Pool ids and combine weights before the sentinel mapping (copy / constant slots keep theirs)."""
    top, ids = torch.softmax(h @ router.weight.T, -1).topk(K, -1)
    return ids, top / top.sum(-1, keepdim=True)


def test_masked_is_exactly_the_original():
    ids = torch.randint(0, 128, (2, 12))
    model = inject(tiny_model("qwen3_moe"), MoEPlusPlus(gating_residual=True, seed=0))
    set_zero_mask(model, True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model("qwen3_moe")(ids).logits)


def test_gating_residual_adds_previous_layer_logits():
    model = inject(tiny_model("qwen3_moe"), MoEPlusPlus(gating_residual=True, seed=0))
    r0, r1 = model.model.layers[0].mlp.gate, model.model.layers[1].mlp.gate
    assert all(torch.count_nonzero(r.residual_gate) == 0 for r in (r0, r1))  # starts as plain routing
    with torch.no_grad():
        r1.residual_gate.normal_()
    seen = {}
    r1.register_forward_pre_hook(lambda m, args: seen.setdefault("h", args[0].reshape(-1, H).clone()))
    with capture_routing(model) as rec, torch.no_grad():
        model(torch.randint(0, 128, (1, 9)))
    expected = seen["h"] @ r1.weight.T + rec[0].router_logits @ r1.residual_gate.T
    assert torch.allclose(rec[1].router_logits, expected, atol=1e-5)
    assert not torch.allclose(rec[1].router_logits, seen["h"] @ r1.weight.T, atol=1e-3)


def test_registry_config_round_trip_and_reload(tmp_path):
    from zeda_lightning.export import export_model, from_pretrained

    variant = get_routing("moe_plus_plus", num_copy=2, gating_residual=True, seed=1)
    assert routing_from_config(variant.to_config()).init_args() == variant.init_args()
    model = inject(tiny_model("qwen3_moe"), variant)
    with torch.no_grad():
        for r in (model.model.layers[0].mlp.gate, model.model.layers[1].mlp.gate):
            r.const_vectors.normal_()
            r.residual_gate.normal_(std=0.1)
            r.weight[N:] += 1.0
    export_model(model, str(tmp_path / "m"))
    again = from_pretrained(str(tmp_path / "m"))
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-6)


@pytest.mark.parametrize("kw", [{"num_copy": -1}, {"num_zero": 0, "num_copy": 0, "num_constant": 0}])
def test_bad_counts_are_refused(kw):
    with pytest.raises(ValueError, match="num_zero=1, num_copy=1, num_constant=2"):
        MoEPlusPlus(**kw)
