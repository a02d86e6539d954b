"""Real-architecture slices (``zeda_lightning.slices``), on the real configs shrunk to tiny sizes with their structure
kept (Qwen3: MoE from layer 0, q/k norms; GLM: a dense first layer, MLA, a shared expert, sigmoid scores with a
correction bias): the hub's per-expert layout, the index, bf16, the cut depth, loads by transformers, by
``export.from_pretrained`` and by the FSDP2 shard-by-shard loader, deterministic bytes, and refusals."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM

from zeda_lightning import sharding
from zeda_lightning.cli import SUBCOMMANDS, summary
from zeda_lightning.export import from_pretrained
from zeda_lightning.slices import MARKER, REAL_CONFIGS, cut_config, slice_main, write_slice
from tests.helpers import free_port, single_thread  # noqa: F401  (autouse: one intra-op thread)

IDS = torch.tensor([[1, 5, 9, 77, 140, 3, 2, 64]])
SMALL = {
    "qwen3_30b_a3b": {"hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16, "vocab_size": 160,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 8,
                      "num_experts_per_tok": 2, "bos_token_id": 0, "eos_token_id": 1},
    "glm_4_7_flash": {"hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16, "vocab_size": 160,
                      "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
                      "num_experts_per_tok": 2, "q_lora_rank": 16, "kv_lora_rank": 8, "qk_nope_head_dim": 8,
                      "qk_rope_head_dim": 4, "v_head_dim": 8, "pad_token_id": 150, "eos_token_id": [150, 151]},
}
DENSE = {"qwen3_30b_a3b": 0, "glm_4_7_flash": 1}


def _small_config(tmp, name: str) -> str:
    with open(REAL_CONFIGS[name]) as f:
        cfg = json.load(f)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({**cfg, **SMALL[name]}))
    return str(path)


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    root = tmp_path_factory.mktemp("slices")
    out = {}
    for name in SMALL:
        source = _small_config(root, name)
        # a small max_shard_size: several shards, so the index really routes tensors
        out[name] = (source, write_slice(source, root / name, max_shard_size="40KB"))
    return out


def _keys(path: str) -> dict[str, str]:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"]


@pytest.mark.parametrize("name", list(SMALL))
def test_the_real_configs_cut_to_their_dense_prefix_plus_moe_layers(name):
    with open(REAL_CONFIGS[name]) as f:
        cfg = json.load(f)
    cut, dense = cut_config(cfg, moe_layers=2)
    assert dense == DENSE[name] and cut["num_hidden_layers"] == dense + 2
    assert {k: v for k, v in cut.items() if k not in ("num_hidden_layers", "max_window_layers")} == {
        k: v for k, v in cfg.items() if k not in ("num_hidden_layers", "max_window_layers")}  # every size real


@pytest.mark.parametrize("name", list(SMALL))
def test_the_slice_is_in_the_hub_layout(slices, name):
    source, path = slices[name]
    weight_map = _keys(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    layers = DENSE[name] + 2
    assert cfg["num_hidden_layers"] == layers and cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    assert {int(m.group(1)) for k in weight_map if (m := re.match(r"model\.layers\.(\d+)\.", k))} == set(range(layers))
    assert not [k for k in weight_map if "gate_up_proj" in k or k.endswith("experts.down_proj")]  # nothing fused
    for layer in range(DENSE[name], layers):
        for i in range(8):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{i}.{proj}.weight" in weight_map
    if DENSE[name]:
        assert "model.layers.0.mlp.gate_proj.weight" in weight_map  # the dense first layer
        assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in weight_map
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in weight_map
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 1 and shards == sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    seen, total = {}, 0
    for shard in shards:
        with safe_open(os.path.join(path, shard), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                assert t.dtype == torch.bfloat16, key
                seen[key] = shard
                total += t.numel() * t.element_size()
    assert seen == weight_map  # every tensor where the index says, and nothing else
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        assert json.load(f)["metadata"]["total_size"] == total
    down = f"model.layers.{DENSE[name]}.mlp.experts.0.down_proj.weight"
    with safe_open(os.path.join(path, weight_map[down]), framework="pt") as f:
        assert tuple(f.get_slice(down).get_shape()) == (32, 16)  # [hidden, moe_intermediate], as the hub stores it
    with open(os.path.join(path, MARKER)) as f:
        assert json.load(f)["source"] == source
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(os.listdir(path))


@pytest.mark.parametrize("name", list(SMALL))
def test_transformers_and_from_pretrained_load_the_same_model(slices, name):
    _, path = slices[name]
    hf, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = from_pretrained(path)
    with torch.no_grad():
        expected = hf.eval()(input_ids=IDS).logits
        assert torch.equal(ours(input_ids=IDS).logits, expected)
    state = hf.state_dict()
    norm = next(k for k in state if k.endswith("input_layernorm.weight"))
    assert torch.equal(state[norm], torch.ones_like(state[norm]))
    assert 0.015 < state["model.embed_tokens.weight"].std().item() < 0.025  # normal(0, initializer_range)


def test_the_same_seed_writes_the_same_bytes_and_a_foreign_directory_is_refused(slices, tmp_path):
    source, first = slices["glm_4_7_flash"]
    again = write_slice(source, tmp_path / "again", max_shard_size="40KB")
    files = sorted(os.listdir(first))
    assert sorted(os.listdir(again)) == files
    for file in files:
        with open(os.path.join(first, file), "rb") as a, open(os.path.join(again, file), "rb") as b:
            assert a.read() == b.read(), file
    other = write_slice(source, tmp_path / "other", seed=1, max_shard_size="40KB")
    shard = sorted(_keys(first).values())[0]
    with open(os.path.join(first, shard), "rb") as a, open(os.path.join(other, shard), "rb") as b:
        assert a.read() != b.read()

    with pytest.raises(FileExistsError, match="already holds a slice"):
        write_slice(source, again)
    assert write_slice(source, again, seed=1, overwrite=True) == again  # a slice is replaced on request

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by write_slice"):
        write_slice(source, foreign, overwrite=True)
    assert os.listdir(foreign) == ["notes.txt"] and (foreign / "notes.txt").read_text() == "mine"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left behind


def test_the_slice_subcommand(tmp_path):
    assert SUBCOMMANDS["slice"].command is slice_main and summary("slice").startswith("Write a real-architecture")
    out = slice_main(_small_config(tmp_path, "qwen3_30b_a3b"), str(tmp_path / "s"))
    assert out["out"] == str(tmp_path / "s") and out["layers"] == 2 and out["shards"] == 1
    assert out["bytes"] == 2 * out["params"] > 0


def _sharded(rank, world, port, path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = sharding.load_sharded(path, init_device_mesh("cpu", (world,)))
        experts = sharding.decoder_layers(model)[1].mlp.experts
        with torch.no_grad():
            logits = model(input_ids=IDS).logits
        if rank == 0:
            torch.save({"logits": logits, "rows": experts.gate_up_proj.to_local().shape[0]}, out)
    finally:
        dist.destroy_process_group()


def test_the_fsdp2_loader_reads_a_slice_shard_by_shard(slices, tmp_path):
    _, path = slices["glm_4_7_flash"]
    out = tmp_path / "rank0.pt"
    mp.spawn(_sharded, args=(2, free_port(), path, str(out)), nprocs=2)
    got = torch.load(out, weights_only=False)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(input_ids=IDS).logits
    assert got["rows"] == 4  # 8 experts, half on each rank
    assert torch.equal(got["logits"], expected)
