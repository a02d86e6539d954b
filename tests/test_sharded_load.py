"""The shard-by-shard loader reads checkpoint keys through transformers' own conversion mapping (one helper with
``from_pretrained``): Mixtral's hub layout (``block_sparse_moe.experts.{e}.w1/w2/w3``) loads under FSDP2 with the
logits of transformers' own load, each rank reading only its experts; the compute budget comes from the weights, or
from ``config.zeda_budget`` for an export written before the biases were buffers."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from zeda_lightning.adapters import inject
from zeda_lightning.budget import set_zero_logit_bias, zero_logit_biases
from zeda_lightning.export import BUDGET_KEY, export_model, from_pretrained
from zeda_lightning.routing import ZeroExperts
from zeda_lightning.sharding import SafetensorsReader, build_empty
from zeda_lightning.tiny import tiny_model
from tests.helpers import free_port, single_thread  # noqa: F401  (autouse: one intra-op thread)

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
BIASES = [0.75, 1.25]  # one per layer of the tiny models, exact in float32


def _keys(path) -> list[str]:
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def _strip_budget_buffers(path) -> None:
    """Make ``path`` look like an export written before the biases were buffers: no bias tensors in the weights,
    the record in config.json written as Python floats (not rounded to float32)."""
    file = os.path.join(path, "model.safetensors")
    weights = load_file(file)
    save_file({k: v for k, v in weights.items() if not k.endswith(".zero_logit_bias")}, file, metadata={"format": "pt"})
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    cfg[BUDGET_KEY]["zero_logit_bias"] = [0.1, 0.2]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    hub = root / "mixtral_hub"
    tiny_model("mixtral").save_pretrained(hub)  # transformers 5 saves Mixtral back in the hub's per-expert layout
    student = inject(tiny_model("mixtral"), ZeroExperts(seed=0))
    set_zero_logit_bias(student, BIASES, {"target": 0.5})
    export = export_model(student, str(root / "mixtral_zeda"))
    legacy = export_model(student, str(root / "mixtral_legacy"))
    _strip_budget_buffers(legacy)
    qwen = root / "qwen_hub"
    tiny_model("qwen3_moe").save_pretrained(qwen)
    return {"hub": str(hub), "zeda": export, "legacy": legacy, "qwen": str(qwen)}


def test_the_fixtures_are_in_the_layouts_they_stand_for(dirs):
    hub = _keys(dirs["hub"])
    assert "model.layers.0.block_sparse_moe.experts.7.w3.weight" in hub
    assert not any(".mlp." in k or "gate_up_proj" in k for k in hub)
    assert "model.layers.0.block_sparse_moe.gate.zero_logit_bias" in _keys(dirs["zeda"])  # the budget, in the weights
    assert not any(k.endswith("zero_logit_bias") for k in _keys(dirs["legacy"]))
    assert json.loads(open(os.path.join(dirs["legacy"], "config.json")).read())[BUDGET_KEY]["zero_logit_bias"] == [0.1, 0.2]


@pytest.mark.parametrize("which", ["hub", "qwen"])
def test_reader_stacks_per_expert_tensors_reading_only_the_requested_experts(dirs, which):
    path = dirs[which]
    reader = SafetensorsReader(path)
    model = build_empty(path, reader=reader)
    reference = AutoModelForCausalLM.from_pretrained(path).state_dict()
    read = []
    real_read = reader._read
    reader._read = lambda key, start, stop: read.append(key) or real_read(key, start, stop)
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    got = reader.rows(fused, 2, 6, reference[fused][2:6].shape)
    assert torch.equal(got, reference[fused][2:6])
    experts = sorted({int(k.split("experts.")[1].split(".")[0]) for k in read})
    assert experts == [2, 3, 4, 5] and len(read) == 8  # gate and up of experts 2..5, nothing else
    down = "model.layers.0.mlp.experts.down_proj"
    assert torch.equal(reader.rows(down, 0, 8, reference[down].shape), reference[down])
    gate = "model.layers.0.mlp.gate.weight"  # Mixtral: renamed from block_sparse_moe.gate.weight
    assert gate in reader and torch.equal(reader.rows(gate, 0, 8, reference[gate].shape), reference[gate])
    assert {n for n, _ in model.named_parameters()} <= set(reference)
    with pytest.raises(ValueError, match="no tensor model.layers.0.mlp.nothing"):
        reader.rows("model.layers.0.mlp.nothing", 0, 1, (1,))


def test_whole_model_loads_agree_on_the_budget_new_and_legacy(dirs):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new, legacy = from_pretrained(dirs["zeda"]), from_pretrained(dirs["legacy"])
    assert not [w for w in caught if BUDGET_KEY in str(w.message)]  # the legacy record applies without a warning
    assert zero_logit_biases(new) == BIASES
    assert zero_logit_biases(legacy) == [float(torch.tensor(b)) for b in (0.1, 0.2)]  # from its config record
    assert getattr(legacy.config, BUDGET_KEY)["target"] == 0.5  # the calibration record is kept


def _sharded(rank, world, port, dirs, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from zeda_lightning import sharding
        from zeda_lightning.budget import zero_logit_biases

        mesh = init_device_mesh("cpu", (world,))
        result = {}
        for name in ("hub", "zeda", "legacy"):
            model = sharding.load_sharded(dirs[name], mesh)
            experts = sharding.decoder_layers(model)[0].mlp.experts
            with torch.no_grad():
                logits = model(input_ids=IDS).logits
            result[name] = {"logits": logits, "local_rows": experts.gate_up_proj.to_local().shape[0],
                            "biases": zero_logit_biases(model) if name != "hub" else None}
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def test_mixtral_hub_layout_and_zeda_exports_load_shard_by_shard_with_transformers_logits(dirs, tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_sharded, args=(2, free_port(), dirs, str(out)), nprocs=2)
    got = torch.load(out, weights_only=False)
    with torch.no_grad():
        expected = {
            "hub": AutoModelForCausalLM.from_pretrained(dirs["hub"]).eval()(input_ids=IDS).logits,
            "zeda": from_pretrained(dirs["zeda"])(input_ids=IDS).logits,
            "legacy": from_pretrained(dirs["legacy"])(input_ids=IDS).logits,
        }
    for name, ref in expected.items():
        assert got[name]["local_rows"] == 4, name  # 8 experts, half on each rank
        assert torch.equal(got[name]["logits"], ref), name
    assert got["zeda"]["biases"] == BIASES  # filled from the weights
    assert got["legacy"]["biases"] == [float(torch.tensor(b)) for b in (0.1, 0.2)]  # from config.zeda_budget
    assert not torch.equal(expected["zeda"], expected["legacy"])  # and the two budgets really differ
