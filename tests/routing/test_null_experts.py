"""Null experts: renormalisation over real experts only, shared vs independent null logits."""

import math

import torch

from tests.helpers import one_hot_tokens, router_on_logits
from zeda_lightning import NullExperts, inject
from zeda_lightning.tiny import tiny_model


def _set_null(router, values):
    with torch.no_grad():
        router.null_weight.zero_()
        router.null_weight[:, : len(values)] = torch.tensor(values)


def test_num_null_slots():
    router = router_on_logits("qwen3_moe", NullExperts(rho=0.5), torch.zeros(8, 32))
    assert router.num_null == 8 and router.null_weight.shape == (1, 32)
    router = router_on_logits("qwen3_moe", NullExperts(rho=0.8), torch.zeros(8, 32))
    assert router.num_null == 2  # 8 * 0.2 / 0.8


def test_renorm_over_real_only_and_all_null_token():
    real = torch.zeros(8, 32)
    real[0, 0], real[1, 0] = 1.0, 0.2  # token 0: expert 0 beats the null logit 0.8, expert 1 does not
    real[:, 1] = 0.1  # token 1: every real logit below the null logit 3.0
    router = router_on_logits("qwen3_moe", NullExperts(rho=0.5), real)
    _set_null(router, [0.8, 3.0])
    logits, weights, idx = router(one_hot_tokens(2))
    assert logits.shape == (2, 16)
    assert idx[0].tolist() == [0, 8]
    assert torch.equal(weights[0], torch.tensor([1.0, 0.0]))  # renorm over the single real expert
    assert idx[1].tolist() == [8, 8] and torch.equal(weights[1], torch.zeros(2))


def test_two_real_experts_renorm():
    real = torch.zeros(8, 32)
    real[3, 0], real[5, 0] = 2.0, 1.0
    router = router_on_logits("qwen3_moe", NullExperts(rho=0.5), real)
    _set_null(router, [-4.0])
    _, weights, idx = router(one_hot_tokens(1))
    e = math.exp
    assert idx[0].tolist() == [3, 5]
    assert torch.allclose(weights[0], torch.tensor([e(2) / (e(2) + e(1)), e(1) / (e(2) + e(1))]), atol=1e-6)


def test_sigmoid_family_null_renorm_times_scaling():
    real = torch.zeros(8, 32)
    real[2, 0] = 2.0
    router = router_on_logits("glm4_moe_lite", NullExperts(rho=0.5), real)
    _set_null(router, [1.0])
    _, weights, idx = router(one_hot_tokens(1))
    got = dict(zip(idx[0].tolist(), weights[0].tolist()))
    assert set(got) == {2, 8} and math.isclose(got[2], 1.8, rel_tol=1e-6) and got[8] == 0.0


def test_independent_null_logits():
    router = router_on_logits("qwen3_moe", NullExperts(rho=0.5, independent=True), torch.zeros(8, 32))
    assert router.null_weight.shape == (8, 32)
    with torch.no_grad():
        router.null_weight.zero_()
        router.null_weight[5, 0] = 4.0  # one null slot wins for token 0
    logits, weights, idx = router(one_hot_tokens(1))
    assert logits[0, 8 + 5] == 4.0 and 8 in idx[0].tolist()


def test_null_experts_train_finite():
    model = inject(tiny_model("qwen3_moe"), NullExperts(rho=0.5, seed=0))
    ids = torch.randint(0, 128, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    router = model.model.layers[0].mlp.gate
    assert torch.isfinite(loss) and router.null_weight.grad is not None and router.null_weight.grad.abs().sum() > 0
