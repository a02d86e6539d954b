"""Injection: exact parity with the original model, structure, recorded config, and bad input."""

import pytest
import torch

from zeda_lightning import NullExperts, StaticTopK, TopP, ZeroExperts, inject
from zeda_lightning.adapters import CONFIG_KEY, adapter_for, routing_state_keys
from zeda_lightning.routing import BaseRouter, ZeroExpertRouter
from zeda_lightning.tiny import FAMILIES, tiny_model

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference_logits():
    out = {}
    for fam in FAMILIES:
        with torch.no_grad():
            out[fam] = tiny_model(fam)(IDS).logits
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("routing", [ZeroExperts(mask_zero=True, seed=0), NullExperts(rho=1.0)], ids=["zero_masked", "null_rho1"])
def test_parity_bit_identical(family, routing, reference_logits):
    model = inject(tiny_model(family), routing)
    with torch.no_grad():
        logits = model(IDS).logits
    assert torch.equal(logits, reference_logits[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_unmasked_zero_experts_change_output_and_skip(family, reference_logits):
    model = inject(tiny_model(family), ZeroExperts(seed=0))
    with torch.no_grad():
        logits = model(IDS).logits
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits, reference_logits[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_structure_and_config(family):
    original = tiny_model(family)
    adapter = adapter_for(original)
    blocks = adapter.find_blocks(original)
    experts_before = {n: [p.data_ptr() for p in b.experts.parameters()] for n, b in blocks}
    old_rows = {n: adapter.original(b).weight.detach().clone() for n, b in blocks}
    model = inject(original, ZeroExperts(seed=0))
    for name, block in adapter.find_blocks(model):
        router = getattr(block, adapter.router_attr)
        assert isinstance(router, ZeroExpertRouter)
        n = router.num_experts
        assert router.weight.shape[0] == n + n // 2
        assert torch.equal(router.weight[:n], old_rows[name])  # original rows copied exactly
        assert [p.data_ptr() for p in block.experts.parameters()] == experts_before[name]  # experts untouched
        if router.e_score_correction_bias is not None:
            assert router.e_score_correction_bias.shape == (n + n // 2,)
    cfg = getattr(model.config, CONFIG_KEY)
    assert cfg["class_path"] == "zeda_lightning.routing.zero_experts.ZeroExperts"
    assert cfg["init_args"] == {"num_zero_experts": None, "mask_zero": False, "seed": 0}
    assert "zeda_routing" in model.config.to_dict()
    keys = routing_state_keys(model)
    assert keys and all(k in model.state_dict() for k in keys)
    layers = sorted(r.layer_idx for r in model.modules() if isinstance(r, BaseRouter))
    assert layers == sorted(set(layers)) and len(layers) == len(blocks)


def test_router_init_statistics():
    """New rows: per-dimension mean/std of the old rows, within sampling tolerance."""
    model = tiny_model("qwen3_moe", num_experts=64, num_experts_per_tok=4, hidden_size=64, num_attention_heads=4)
    old = model.model.layers[0].mlp.gate.weight.detach().clone()  # (64, 64)
    inject(model, ZeroExperts(num_zero_experts=4096, seed=1))
    new = model.model.layers[0].mlp.gate.weight.detach()[64:]  # (4096, 64)
    # 4096 samples per dim: the sample mean is within ~4 / sqrt(4096) std of the target
    tol = 4 * old.std(0) / 64
    assert ((new.mean(0) - old.mean(0)).abs() < tol).all()
    assert ((new.std(0) / old.std(0) - 1).abs() < 0.1).all()


@pytest.mark.parametrize("fam, name", [("gpt_oss", "bias"), ("glm4_moe_lite", "e_score_correction_bias"),
                                       ("ernie4_5_moe", "e_score_correction_bias"),
                                       ("lfm2_moe", "e_score_correction_bias")])
def test_router_bias_and_correction_bias_grow(fam, name):
    """The bias and the correction bias grow N -> N + N_Z wherever the family keeps them (ERNIE: a nested module,
    LFM2: the block), original entries copied, new ones sampled."""
    model = tiny_model(fam)
    adapter = adapter_for(model)
    _, block = adapter.find_blocks(model)[0]
    old = getattr(adapter.original(block), name).detach().clone()
    inject(model, ZeroExperts(seed=0))
    new = getattr(getattr(block, adapter.router_attr), name)
    assert new.shape == (12,) and torch.equal(new[:8], old)
    assert not torch.equal(new[8:], torch.zeros(4))


# --- bad input: clear ValueError, model untouched ---------------------------------------------------------------


def _routers(model):
    return [type(m).__name__ for m in model.modules() if m.__class__.__name__.endswith("Router")]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ZeroExperts(num_zero_experts=-1), "num_zero_experts must be >= 0"),
        (lambda: NullExperts(rho=0.0), r"rho must be in \(0, 1\]"),
        (lambda: NullExperts(rho=1.5), r"rho must be in \(0, 1\]"),
        (lambda: TopP(p=0.0), r"p must be in \(0, 1\]"),
        (lambda: TopP(p=1.2), r"p must be in \(0, 1\]"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_static_topk_k_not_below_K_leaves_model_untouched():
    model = tiny_model("qwen3_moe")
    before = _routers(model)
    with pytest.raises(ValueError, match="must be smaller than the model's top-k K=2"):
        inject(model, StaticTopK(k=2))
    assert _routers(model) == before and not hasattr(model.config, CONFIG_KEY)


def test_unknown_family_lists_supported():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"unknown MoE family 'llama'.*qwen3_moe.*@register_adapter"):
        inject(model, ZeroExperts())


def test_model_without_moe_layer():
    model = tiny_model("qwen3_moe", mlp_only_layers=[0, 1])
    with pytest.raises(ValueError, match="has no MoE layer"):
        inject(model, ZeroExperts())


def test_double_injection_refused():
    model = inject(tiny_model("qwen3_moe"), ZeroExperts())
    with pytest.raises(ValueError, match="already has injected routers"):
        inject(model, ZeroExperts())


def test_output_router_logits_config_does_not_break_injected_model():
    model = inject(tiny_model("qwen3_moe", output_router_logits=True), ZeroExperts(seed=0))
    ids = torch.randint(0, 128, (2, 8))
    out = model(ids, labels=ids)  # transformers' own balance loss would find no router logits of its class
    assert torch.isfinite(out.loss) and model.config.output_router_logits is False
