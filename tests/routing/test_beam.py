"""BEAM: the mask router against hand computation, the straight-through gradient, exact start and masking, skipped
compute in eval, the sparsity term holding a target, and the export round trip."""

import math

import pytest
import torch

from tests.helpers import ExpertRowCounter, one_hot_tokens, router_on_logits, single_thread  # noqa: F401
from zeda_lightning.adapters import inject, set_zero_mask
from zeda_lightning.analysis import zero_ratio
from zeda_lightning.losses.router_losses import BeamSparsity
from zeda_lightning.routing import Beam, BeamRouter, capture_routing, get_routing, iter_routers, routing_from_config
from zeda_lightning.tiny import tiny_model

N, K, H = 8, 2, 32  # tiny qwen3_moe: 8 experts, top-2, hidden 32
sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def _router(mask_logits: dict[int, float]):
    """Token 0 (hidden e_0) picks experts 2 (logit 2.0) and 5 (1.0); mask logits per expert for that token."""
    rows = torch.zeros(N, H)
    rows[2, 0], rows[5, 0] = 2.0, 1.0
    router = router_on_logits("qwen3_moe", Beam(), rows)
    with torch.no_grad():
        for e, z in mask_logits.items():
            router.mask_weight[e, 0] = z
    return router


def test_mask_gates_the_top_k_weights_without_renorm():
    router = _router({2: -1.0, 5: 0.5})  # expert 2's slot is switched off, expert 5's kept
    e = math.exp
    g5 = e(1) / (e(2) + e(1))  # expert 5's original top-2 weight (norm_topk_prob)
    router.eval()
    out = router.route(one_hot_tokens(1))
    assert out.selected_experts[0].tolist() == [N, 5]  # eval: the masked slot (expert 2) is a sentinel
    assert torch.allclose(out.routing_weights[0], torch.tensor([0.0, g5]), atol=1e-6)  # kept weight not renormed
    assert torch.allclose(out.mask_probs[0], torch.tensor([sig(-1.0), sig(0.5)]), atol=1e-6)
    assert out.skipped[0].tolist() == [True, False]
    router.train()
    out = router.route(one_hot_tokens(1))
    assert out.selected_experts[0].tolist() == [2, 5]  # training: the off slot still runs, at weight 0
    assert torch.equal(out.routing_weights[0] == 0, torch.tensor([True, False]))
    assert out.skipped[0].tolist() == [True, False]  # accounting is the same in both modes


def test_straight_through_gradient_by_hand():
    router = _router({2: -1.0, 5: 0.5})
    router.train()
    _, weights, _ = router(one_hot_tokens(1))
    c = torch.tensor([3.0, 7.0])
    (weights[0] * c).sum().backward()
    e = math.exp
    g2, g5 = e(2) / (e(2) + e(1)), e(1) / (e(2) + e(1))
    dsig = lambda z: sig(z) * (1 - sig(z))  # noqa: E731
    # d/dz_j of c_j g_j m_j with the STE dm/dm_hat = 1: c_j g_j sigmoid'(z_j), times x_0 = 1
    assert math.isclose(router.mask_weight.grad[2, 0].item(), 3.0 * g2 * dsig(-1.0), rel_tol=1e-5)  # off, still learns
    assert math.isclose(router.mask_weight.grad[5, 0].item(), 7.0 * g5 * dsig(0.5), rel_tol=1e-5)
    assert math.isclose(router.mask_bias.grad[2].item(), 3.0 * g2 * dsig(-1.0), rel_tol=1e-5)
    assert router.mask_weight.grad[[0, 1, 3, 4, 6, 7]].abs().sum() == 0  # experts not selected get nothing


def test_starts_as_the_original_and_mask_zero_is_exact():
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = tiny_model("qwen3_moe")(ids).logits
        model = inject(tiny_model("qwen3_moe"), Beam())
        assert torch.equal(model(ids).logits, ref)  # W_m = 0: m_hat = 0.5 keeps every slot, weights times exactly 1
        for r in iter_routers(model):
            r.mask_bias.normal_()
            r.mask_weight.normal_()
        assert not torch.equal(model(ids).logits, ref)
        assert set_zero_mask(model, True) == 2
        assert torch.equal(model(ids).logits, ref)
        for r in iter_routers(model):  # shared-weights teacher: the masked path keeps the original rows
            r.freeze_original_rows()
            r.weight.add_(1.0)
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_masked_slots_cost_no_expert_rows_in_eval(impl):
    torch.manual_seed(0)
    model = inject(tiny_model("qwen3_moe"), Beam())
    model.set_experts_implementation(impl)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.gate.mask_weight.normal_(std=2.0)
    h = torch.randn(16, H)
    outs = {}
    for mode in ("eval", "train"):
        getattr(block, mode)()
        with torch.no_grad():
            _, w, idx = block.gate(h)
            kept = int((w != 0).sum())
            with ExpertRowCounter() as counter:
                outs[mode] = block.experts(h, idx, w)
        rows = 2 * kept if mode == "eval" else 2 * 16 * K  # up + down rows per slot that runs
        assert counter.rows == rows, (mode, counter.rows, kept)
    assert 0 < kept < 16 * K
    assert torch.allclose(outs["eval"], outs["train"], atol=1e-6)  # a weight-0 slot adds nothing


def test_gradient_reaches_the_mask_router_of_every_layer_even_with_every_slot_off():
    model = inject(tiny_model("qwen3_moe"), Beam()).train()
    with torch.no_grad():
        model.model.layers[1].mlp.gate.mask_bias.fill_(-10.0)  # layer 1: every slot masked
    ids = torch.randint(0, 128, (2, 16))
    with capture_routing(model) as rec:
        loss = model(ids, labels=ids).loss
    assert rec[1].skipped.all() and not rec[0].skipped.any()
    loss.backward()
    for r in iter_routers(model):
        assert r.mask_weight.grad.abs().sum() > 0 and r.mask_bias.grad.abs().sum() > 0, r.layer_idx


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_sparsity_term_holds_its_target_share(target):
    """Only the sparsity term and an Adam step on the mask routers: the skipped share settles at the target."""
    torch.manual_seed(0)
    model = inject(tiny_model("qwen3_moe"), Beam()).train()
    params = [p for r in iter_routers(model) for p in (r.mask_weight, r.mask_bias)]
    opt = torch.optim.Adam(params, lr=0.02)
    loss_fn = BeamSparsity(coef=1.0, target=target)
    ids = torch.randint(0, 128, (4, 32))
    for _ in range(150):
        with capture_routing(model) as rec:
            model(ids)
        opt.zero_grad()
        loss_fn(list(rec.values()), None).backward()
        opt.step()
    with torch.no_grad(), capture_routing(model.eval()) as rec:
        model(ids)
    assert abs(zero_ratio(rec).item() - target) <= 0.05


def test_registry_config_round_trip_and_reload(tmp_path):
    from zeda_lightning.export import export_model, from_pretrained

    variant = get_routing("beam", mask_zero=False)
    assert routing_from_config(variant.to_config()).init_args() == {"mask_zero": False}
    model = inject(tiny_model("qwen3_moe"), variant)
    with torch.no_grad():
        for r in iter_routers(model):
            r.mask_weight.normal_()
            r.mask_bias.normal_()
    export_model(model, str(tmp_path / "m"))
    again = from_pretrained(str(tmp_path / "m")).eval()
    assert all(isinstance(r, BeamRouter) for r in iter_routers(again))
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        with capture_routing(model.eval()) as a:
            ref = model(ids).logits
        with capture_routing(again) as b:
            out = again(ids).logits
    assert torch.allclose(out, ref, atol=1e-6)
    assert all(torch.equal(a[i].skipped, b[i].skipped) for i in a) and 0 < zero_ratio(a).item() < 1
