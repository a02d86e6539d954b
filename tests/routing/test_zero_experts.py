"""ZEDA routing math against hand computation (softmax and sigmoid families)."""

import math

import torch

from tests.helpers import one_hot_tokens, router_on_logits
from zeda_lightning import ZeroExperts, capture_routing, inject
from zeda_lightning.tiny import tiny_model


def _rows(real, zero, hidden=32):
    """Pool logits (P, H): column j holds token j's logits."""
    cols = torch.tensor([r + z for r, z in zip(real, zero)], dtype=torch.float32).T  # (P, tokens)
    return torch.nn.functional.pad(cols, (0, hidden - cols.shape[1]))


def test_softmax_family_drop_without_renorm():
    # token 0: real expert 0 (2.0) and zero expert 9 (1.5) win; token 1: real experts 1 (3.0) and 2 (2.5) win
    real = [[2.0, 0, 0, 0, 0, 0, 0, 0], [0, 3.0, 2.5, 0, 0, 0, 0, 0]]
    zero = [[0.5, 1.5, 0, 0], [0, 0, 0, 0]]
    router = router_on_logits("qwen3_moe", ZeroExperts(), _rows(real, zero))
    _, weights, idx = router(one_hot_tokens(2))
    assert idx[0].tolist() == [0, 8]  # zero slot -> sentinel N = 8
    e = math.exp
    # NOTE: softmax over all 12, renorm over the 2 slots (zero included), then the zero slot is dropped
    w0 = e(2.0) / (e(2.0) + e(1.5))
    assert torch.allclose(weights[0], torch.tensor([w0, 0.0]), atol=1e-6)
    assert idx[1].tolist() == [1, 2]
    assert torch.allclose(weights[1], torch.tensor([e(3.0) / (e(3.0) + e(2.5)), e(2.5) / (e(3.0) + e(2.5))]), atol=1e-6)


def test_sigmoid_family_bias_selection_and_scaling():
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    real = [[2.0, 0.5, 0, 0, 0, 0, 0, 0]]
    zero = [[1.0, -1.0, -1.0, -1.0]]
    router = router_on_logits("glm4_moe_lite", ZeroExperts(), _rows(real, zero))
    _, weights, idx = router(one_hot_tokens(1))
    assert sorted(idx[0].tolist()) == [0, 8]
    w0 = sig(2.0) / (sig(2.0) + sig(1.0)) * 1.8  # routed_scaling_factor of GLM-4.7-Flash's tiny flavour
    got = dict(zip(idx[0].tolist(), weights[0].tolist()))
    assert math.isclose(got[0], w0, rel_tol=1e-6) and got[8] == 0.0
    # the correction bias steers selection only: a large bias on real expert 1 picks it, weights stay unbiased
    with torch.no_grad():
        router.e_score_correction_bias[1] = 5.0
    _, weights, idx = router(one_hot_tokens(1))
    assert sorted(idx[0].tolist()) == [0, 1]
    got = dict(zip(idx[0].tolist(), weights[0].tolist()))
    assert math.isclose(got[1], sig(0.5) / (sig(2.0) + sig(0.5)) * 1.8, rel_tol=1e-6)


def test_sigmoid_groups_cover_real_experts_only():
    # deepseek tiny: 8 real experts in 2 groups of 4, topk_group = 1. Group 0 has the better top-2 sum, group 1 the
    # single best expert: only group 0's experts and the (group-less) zero experts may be picked.
    real = [[1.0, 1.0, 0, 0, 3.0, -5, -5, -5]]
    zero = [[0.5, -3, -3, -3]]
    router = router_on_logits("deepseek_v3", ZeroExperts(), _rows(real, zero))
    _, weights, idx = router(one_hot_tokens(1))
    picked = sorted(idx[0].tolist())
    assert 4 not in picked and picked == [0, 1]
    # with a zero expert scoring above group 0, it is picked although it belongs to no group
    with torch.no_grad():
        router.weight[8, 0] = 4.0
    _, weights, idx = router(one_hot_tokens(1))
    assert sorted(idx[0].tolist()) in ([0, 8], [1, 8])
    assert weights[0][idx[0] == 8].item() == 0.0


def test_all_zero_slots_give_exactly_zero_from_routed_experts():
    model = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=0))
    block = model.model.layers[0].mlp
    block.gate.zero_logit_bias = 1e4  # every slot picks a zero expert
    h = torch.randn(1, 5, 32)
    with capture_routing(model) as rec:
        out = block(h)
    assert rec[0].skipped.all()
    assert torch.equal(out, torch.zeros_like(out))


def test_mask_zero_switch_round_trip():
    model = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=0))
    ids = torch.randint(0, 128, (1, 10))
    from zeda_lightning import set_zero_mask

    with torch.no_grad():
        unmasked = model(ids).logits
        set_zero_mask(model, True)
        masked = model(ids).logits
        set_zero_mask(model, False)
        again = model(ids).logits
    assert torch.equal(unmasked, again) and not torch.equal(masked, unmasked)
    assert torch.equal(masked, tiny_model("qwen3_moe")(ids).logits)


def test_router_output_record():
    model = inject(tiny_model("glm4_moe_lite"), ZeroExperts(seed=0))
    with capture_routing(model) as rec:
        model(torch.randint(0, 128, (2, 7)))
    assert sorted(rec) == [1, 2]  # layer 0 of the GLM-4.7-Flash flavour is dense
    r = rec[1]
    assert r.router_logits.shape == (14, 12) and r.selected_experts.shape == (14, 2)
    assert r.score_func == "sigmoid" and r.num_experts == 8 and r.top_k == 2
    # pool ids >= N are exactly the skipped slots
    assert torch.equal(r.pool_indices >= 8, r.skipped)
    assert (r.routing_weights[r.skipped] == 0).all()


def test_pool_logits_are_fp32_under_bf16_autocast():
    """ZEDA trains its router in fp32: under bf16 autocast the extended router still computes fp32 logits (top-K
    over N + N_Z bf16-rounded logits would tie) and hands the experts weights in the autocast dtype, as the original
    router does; masked, it is the original op sequence."""
    torch.manual_seed(0)
    model = tiny_model("qwen3_moe").eval()
    inject(model, ZeroExperts(seed=0))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        with capture_routing(model) as fp32:
            ref = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16), capture_routing(model) as mixed:
            out = model(input_ids=ids).logits
    assert torch.isfinite(out).all() and (out.float() - ref).abs().max() < 0.5
    for layer, rec in mixed.items():
        assert rec.router_logits.dtype == torch.float32
        # same hidden states in, same choice out: layer 0 sees identical inputs in both runs
        if layer == min(mixed):
            assert torch.allclose(rec.router_logits, fp32[layer].router_logits, atol=0.05)
    router = next(m for m in model.modules() if hasattr(m, "num_zero_experts"))
    h = torch.randn(5, model.config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, weights, _ = router(h)
    assert logits.dtype == torch.float32 and weights.dtype == torch.bfloat16


def test_each_layer_draws_its_own_new_rows_and_the_seed_reproduces_them():
    """New rows are mean_d + std_d * randn per layer: one seeded generator serves the whole model, so layers get
    independent noise (a fresh generator per layer would give every layer the same randn matrix)."""

    def noise(seed):
        torch.manual_seed(0)
        model = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=seed))
        out = []
        for r in (m for m in model.modules() if hasattr(m, "num_zero_experts")):
            real, new = r.weight[: r.num_experts], r.weight[r.num_experts :]
            out.append((new - real.mean(0)) / real.std(0))  # the randn draw behind each new row
        return out

    a, b = noise(3), noise(3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # reproducible
    assert len(a) > 1 and not torch.allclose(a[0], a[1], atol=1e-3)  # but not the same across layers
    assert not torch.allclose(a[0], noise(4)[0], atol=1e-3)
