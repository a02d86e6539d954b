"""The real-model configs build on the meta device, inject to the paper's shapes, and ``estimate`` reports
parameters, trainable parameters and memory per GPU for every preset and strategy without allocating weights."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import resource

import pytest
import torch
import yaml

from zeda_lightning.cli import main as cli_entry
from zeda_lightning.data.module import ZedaDataModule
from zeda_lightning.estimate import GIB
from zeda_lightning.routing import ZeroExperts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {  # name: (N real experts, K, MoE layers, has correction bias)
    "qwen3_30b_a3b": (128, 8, 48, False),
    "glm_4_7_flash": (64, 4, 46, True),
}


def run_estimate(*argv) -> tuple[str, dict]:
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out):
            cli_entry(["estimate", *argv])
    finally:
        os.chdir(cwd)
    text = out.getvalue()
    return text, json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=sorted(MODELS))
def estimated(request):
    name = request.param
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    text, result = run_estimate("--config", f"configs/{name}/sft.yaml")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return name, text, result, grown_kib


def by(result, preset, strategy):
    (row,) = [r for r in result["estimates"] if r["preset"] == preset and r["strategy"] == strategy]
    return row


def test_real_model_injects_to_the_paper_shapes(estimated):
    from zeda_lightning.adapters import inject
    from zeda_lightning.routing import BaseRouter
    from zeda_lightning.sharding import build_empty

    name, *_ = estimated
    n, k, moe_layers, has_bias = MODELS[name]
    model = build_empty(os.path.join(ROOT, "assets", "configs", name))
    inject(model, ZeroExperts(), init=False)
    routers = [m for m in model.modules() if isinstance(m, BaseRouter)]
    assert len(routers) == moe_layers
    assert all(p.is_meta for p in model.parameters())
    for r in routers:
        assert tuple(r.weight.shape) == (n + n // 2, model.config.hidden_size) and r.top_k == k
        if has_bias:
            assert tuple(r.e_score_correction_bias.shape) == (n + n // 2,)
        else:
            assert r.e_score_correction_bias is None


def test_estimate_prints_every_preset_and_strategy_without_allocating_weights(estimated):
    name, text, result, grown_kib = estimated
    rows = result["estimates"]
    assert {(r["preset"], r["strategy"]) for r in rows} == {
        (p, s) for p in ("full", "router_only", "router_and_experts") for s in ("fsdp2", "fsdp1", "ddp")}
    for r in rows:
        assert f"{r['preset']:<20}{r['strategy']:<9}" in text
    assert rows[0]["params"] > 29e9
    assert grown_kib < 2 * 1024**2  # far below even one bf16 copy of the weights (about 60 GB)


def test_trainable_counts_match_the_config(estimated):
    name, _, result, _ = estimated
    n, _, moe_layers, _ = MODELS[name]
    with open(os.path.join(ROOT, "assets", "configs", name, "config.json")) as f:
        cfg = json.load(f)
    h, i = cfg["hidden_size"], cfg["moe_intermediate_size"]
    routers = moe_layers * (n + n // 2) * h
    experts = moe_layers * n * 3 * h * i
    assert by(result, "router_only", "fsdp2")["trainable"] == routers
    assert by(result, "router_and_experts", "fsdp2")["trainable"] == routers + experts
    full = by(result, "full", "fsdp2")
    assert full["trainable"] == full["params"]
    if name == "qwen3_30b_a3b":  # every parameter of the Qwen3-MoE architecture, counted by hand
        v, nh, nkv, hd = cfg["vocab_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 2 * hd
        per_layer = attn + 2 * h + (n + n // 2) * h + n * 3 * h * i
        assert full["params"] == 2 * v * h + h + moe_layers * per_layer
        assert full["teacher_params"] == full["params"] - moe_layers * (n // 2) * h  # the teacher has N rows


def test_memory_per_gpu_follows_the_sharding(estimated):
    name, _, result, _ = estimated
    full2, full_ddp = by(result, "full", "fsdp2"), by(result, "full", "ddp")
    gb = full2["breakdown_gib"]
    w = full2["world_size"]
    assert w == 8
    # fp32 masters + fp32 grads + two fp32 AdamW states, sharded 8 ways; the teacher in bf16
    assert gb["student"] * GIB == pytest.approx(full2["params"] * 4 / w, rel=1e-3)
    assert gb["optimizer"] == pytest.approx(2 * gb["grads"], rel=1e-3)
    assert gb["teacher"] * GIB == pytest.approx(full2["teacher_params"] * 2 / w, rel=1e-3)
    assert full_ddp["breakdown_gib"]["student"] == pytest.approx(w * gb["student"], rel=1e-3)
    # FSDP1 pays gradients for every flat parameter holding a trainable router; FSDP2 only for the router rows
    r2, r1 = by(result, "router_only", "fsdp2"), by(result, "router_only", "fsdp1")
    assert r1["breakdown_gib"]["grads"] > 100 * r2["breakdown_gib"]["grads"]
    assert r2["gib_per_gpu"] < r1["gib_per_gpu"] < full2["gib_per_gpu"]


def test_more_gpus_shard_the_states_further():
    _, eight = run_estimate("--config", "configs/glm_4_7_flash/opd.yaml")
    _, sixteen = run_estimate("--config", "configs/glm_4_7_flash/opd.yaml", "--num_nodes", "2")
    a, b = by(eight, "full", "fsdp2")["breakdown_gib"], by(sixteen, "full", "fsdp2")["breakdown_gib"]
    for key in ("student", "grads", "optimizer", "teacher"):
        assert b[key] == pytest.approx(a[key] / 2, rel=1e-3)
    assert b["gathered"] == a["gathered"]  # one unit (and the next) unsharded at a time, whatever the GPU count


def tiny_config(path, drop_batch_size: bool = False, **model_args) -> str:
    """``configs/tiny.yaml`` written to ``path``, without ``data.init_args.batch_size`` if asked."""
    with open(os.path.join(ROOT, "configs", "tiny.yaml")) as f:
        cfg = yaml.safe_load(f)
    if drop_batch_size:
        del cfg["data"]["init_args"]["batch_size"]
    cfg["model"]["init_args"].update(model_args)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_estimate_without_a_model_config_names_the_fix(tmp_path):
    cfg = tiny_config(tmp_path / "run.yaml", teacher="/nowhere")
    with pytest.raises(ValueError, match="no config.json at model.init_args.teacher .*--model_dir"):
        run_estimate("--config", cfg)


def test_estimate_reads_the_config_fit_would_run_defaults_and_overrides(tmp_path):
    """The YAML is read by fit's parser: what it leaves out comes from the classes' signatures (the data module's
    batch_size), and flags override it as they do for fit."""
    default = inspect.signature(ZedaDataModule).parameters["batch_size"].default
    assert default == 8
    cfg = tiny_config(tmp_path / "run.yaml", drop_batch_size=True)
    text, result = run_estimate("--config", cfg)
    assert result["batch_size"] == default and result["seq_len"] == 256
    assert f"{default} sequences x 256 tokens per GPU" in text
    _, shorter = run_estimate("--config", cfg, "--data.init_args.batch_size", "3", "--data.init_args.max_length", "64",
                              "--trainer.devices", "2")
    assert shorter["batch_size"] == 3 and shorter["seq_len"] == 64
    assert by(shorter, "full", "fsdp2")["world_size"] == 2
    # a model argument: the shipped config checkpoints activations; switched off, no layer inputs are kept
    _, kept = run_estimate("--config", "configs/qwen3_30b_a3b/sft.yaml")
    _, off = run_estimate("--config", "configs/qwen3_30b_a3b/sft.yaml", "--model.init_args.activation_checkpointing",
                          "false")
    assert by(kept, "full", "fsdp2")["breakdown_gib"]["layer_inputs"] > 0
    assert by(off, "full", "fsdp2")["breakdown_gib"]["layer_inputs"] == 0


def test_estimate_refuses_what_fit_would_refuse_to_parse(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run.yaml")
    with pytest.raises(SystemExit) as err:
        run_estimate("--config", cfg, "--model.init_args.no_such_argument", "1")
    assert err.value.code == 2 and "no_such_argument" in capsys.readouterr().err


def test_activations_per_token_match_what_a_layer_saves_for_backward():
    """The estimate's activation term against the bytes autograd actually keeps for one MoE decoder layer of the
    tiny teacher (every slot real: zero experts masked), counted with saved-tensor hooks, each storage once."""
    from zeda_lightning.adapters import inject
    from zeda_lightning.estimate import activation_values_per_token
    from zeda_lightning.export import from_pretrained
    from zeda_lightning.sharding import decoder_layers

    model = inject(from_pretrained(os.path.join(ROOT, "assets/tiny_teacher")), ZeroExperts(mask_zero=True, seed=0))
    layer = decoder_layers(model)[1]
    tokens = 256
    hidden = torch.randn(1, tokens, model.config.hidden_size, requires_grad=True)
    position_ids = torch.arange(tokens)[None]
    embeddings = model.model.rotary_emb(hidden, position_ids)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:  # parameters are model states, not activations
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(hidden, position_embeddings=embeddings, position_ids=position_ids)
    (out[0] if isinstance(out, tuple) else out).sum().backward()  # the graph is real
    saved = sum(storages.values()) - hidden.numel() * 4  # the layer's input is counted as "layer inputs"
    pool = layer.mlp.gate.weight.shape[0]
    estimated = tokens * activation_values_per_token(model.config, pool) * 4
    assert 0.9 * saved <= estimated <= 1.15 * saved, (estimated, saved)


def test_estimate_of_an_opd_config_starting_from_a_zeda_export(tmp_path):
    """Stage 2 starts from the stage-1 export: its routers are already there (not injected twice), the teacher is
    counted with the original router rows, and the sizes equal those of a fresh student."""
    from zeda_lightning.adapters import inject
    from zeda_lightning.export import export_model, from_pretrained

    teacher = os.path.join(ROOT, "assets/tiny_teacher")
    export_model(inject(from_pretrained(teacher), ZeroExperts(seed=0)), str(tmp_path / "student"))
    base = ["--config", "configs/tiny_opd.yaml", "--devices", "2"]
    _, fresh = run_estimate(*base)
    _, from_export = run_estimate(*base, "--model_dir", str(tmp_path / "student"))
    for a, b in zip(fresh["estimates"], from_export["estimates"]):
        assert (a["params"], a["trainable"], a["teacher_params"]) == (b["params"], b["trainable"], b["teacher_params"])
    assert from_export["estimates"][0]["teacher_params"] < from_export["estimates"][0]["params"]
