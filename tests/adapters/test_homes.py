"""Router tensors stay where each family keeps them (HunYuan ``gate.wg.weight``, ERNIE
``gate.moe_statics.e_score_correction_bias`` (1, N), LFM2's block ``expert_bias``): the injected model has the
original's state-dict keys and checkpoint layout, the sharded loader injects from them, zero slots are not computed,
and a model loaded in bf16 as published (router kept in fp32) stays exact when masked."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.helpers import ExpertRowCounter, free_port, single_thread  # noqa: F401  (autouse: one intra-op thread)
from zeda_lightning import ZeroExperts, inject
from zeda_lightning.adapters import ADAPTERS, adapter_for
from zeda_lightning.budget import set_zero_logit_bias
from zeda_lightning.export import export_model, from_pretrained
from zeda_lightning.routing.zero_experts import BUDGET_BUFFER
from zeda_lightning.tiny import FAMILIES, tiny_model

#: families that keep a router tensor off the router (``FamilyAdapter.tensor_homes``)
HOMED = ("ernie4_5_moe", "hunyuan_v1_moe", "lfm2_moe")
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _saved(path) -> dict[str, tuple[int, ...]]:
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _grown(old: tuple[int, ...], new: tuple[int, ...], n: int = 8, pool: int = 12) -> bool:
    """``new`` is ``old`` with its expert dim (size N) grown to N + N_Z, or equal."""
    return new == old or (len(old) == len(new) and [(a, b) for a, b in zip(old, new) if a != b] == [(n, pool)])


def test_every_homed_family_is_a_tiny_family():
    assert {f for f in FAMILIES if ADAPTERS[f].tensor_homes} == set(HOMED)


@pytest.mark.parametrize("family", FAMILIES)
def test_injected_state_dict_keeps_the_original_keys(family):
    original = tiny_model(family).state_dict()
    injected = inject(tiny_model(family), ZeroExperts(seed=0)).state_dict()
    added = {k for k in injected if k.endswith(f".{BUDGET_BUFFER}")}
    assert set(injected) - added == set(original)
    assert all(_grown(tuple(original[k].shape), tuple(injected[k].shape)) for k in original)


@pytest.mark.parametrize("family", HOMED)
def test_export_is_in_the_published_layout(tmp_path, family):
    """The export holds exactly the tensors ``save_pretrained`` writes for the original (the hub's names: ERNIE's bias
    is ``mlp.moe_statics.e_score_correction_bias``, shaped (1, N + N_Z)), plus the zero-logit biases."""
    tiny_model(family).save_pretrained(tmp_path / "hub")
    export_model(inject(tiny_model(family), ZeroExperts(seed=0)), str(tmp_path / "zeda"))
    hub, zeda = _saved(tmp_path / "hub"), _saved(tmp_path / "zeda")
    assert set(zeda) - {k for k in zeda if k.endswith(f".{BUDGET_BUFFER}")} == set(hub)
    assert all(_grown(hub[k], zeda[k]) for k in hub)
    assert sum(hub[k] != zeda[k] for k in hub) == 2 * (1 + (family != "hunyuan_v1_moe"))  # 2 layers: rows (+ bias)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_slots_of_the_injected_router_are_not_computed(family):
    model = inject(tiny_model(family), ZeroExperts(seed=0))
    set_zero_logit_bias(model, 0.5)
    adapter = adapter_for(model)
    _, block = adapter.find_blocks(model)[0]
    h = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, weights, idx = getattr(block, adapter.router_attr)(h)
        skipped = idx == 8
        assert 0 < int(skipped.sum()) < idx.numel()  # some slots, not all, on zero experts
        with ExpertRowCounter() as rows:
            out = block.experts(h, idx, weights)
        dense = block.experts(h, idx.masked_fill(skipped, 0), weights.masked_fill(skipped, 0.0))
    assert rows.rows == 2 * int((~skipped).sum())  # up + down projection rows of the kept slots only
    assert torch.allclose(out, dense, atol=1e-6)


@pytest.mark.parametrize("family", HOMED)
def test_masked_parity_in_bf16_as_published(tmp_path, family):
    """Loaded in bf16 by transformers (HunYuan's and ERNIE's routers stay fp32): masked, bit-identical logits."""
    tiny_model(family).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = model(IDS).logits
        inject(model, ZeroExperts(mask_zero=True, seed=0))
        assert torch.equal(model(IDS).logits, ref)


def _sharded(rank, world, port, dirs, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from zeda_lightning import sharding

        mesh = init_device_mesh("cpu", (world,))
        result = {}
        for family in HOMED:
            for kind in ("hub", "zeda"):
                routing = ZeroExperts(seed=0) if kind == "hub" else None
                model = sharding.load_sharded(dirs[family][kind], mesh, routing=routing)
                with torch.no_grad():
                    result[family, kind] = model(input_ids=IDS).logits
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def test_sharded_loader_injects_from_and_reads_the_family_homes(tmp_path):
    """FSDP2 over 2 processes: an original checkpoint injected on load (original rows read from the family's homes,
    LFM2's block bias included) and a zeda export give the logits of the unsharded path."""
    dirs = {}
    for family in HOMED:
        hub = tmp_path / family / "hub"
        tiny_model(family).save_pretrained(hub)
        zeda = export_model(inject(tiny_model(family), ZeroExperts(seed=0)), str(tmp_path / family / "zeda"))
        dirs[family] = {"hub": str(hub), "zeda": zeda}
    out = tmp_path / "rank0.pt"
    mp.spawn(_sharded, args=(2, free_port(), dirs, str(out)), nprocs=2)
    got = torch.load(out, weights_only=False)
    for family in HOMED:
        with torch.no_grad():
            fresh = inject(from_pretrained(dirs[family]["hub"]), ZeroExperts(seed=0))(input_ids=IDS).logits
            export = from_pretrained(dirs[family]["zeda"])(input_ids=IDS).logits
        assert torch.equal(got[family, "hub"], fresh), family
        assert torch.equal(got[family, "zeda"], export), family
        assert torch.equal(fresh, export), family  # the export is the same student
