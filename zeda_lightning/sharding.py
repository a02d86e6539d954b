"""Sharding for models that do not fit one device: FSDP2 per decoder layer, weights read shard by shard.

Lightning owns the processes and the device mesh (``ModelParallelStrategy``; ``FSDPStrategy`` as the FSDP1
alternative); this file owns what happens to one model inside ``configure_model``:

    build_empty(dir)   parameters on the meta device (buffers real and small), routers grown and initialised
    shard(model)       ``fully_shard`` each decoder layer, then the root (bf16 compute, activation checkpointing)
    fill(model, dir)   each rank reads only its own rows of every tensor from the safetensors files

so no rank ever holds a full copy of the weights. ``gather_for_export`` and ``consolidate`` turn a sharded student
back into an ordinary transformers directory (the first from live shards at the end of fit, the second offline
from a Lightning distributed checkpoint).
"""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from safetensors import safe_open
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from zeda_lightning.adapters import CONFIG_KEY, adapter_for, inject, routing_state_keys
from zeda_lightning.checkpoint_keys import CheckpointKeys
from zeda_lightning.checkpointing import checkpoint_meta, read_dcp_metadata, safe_filesystem_reader
from zeda_lightning.export import (
    budget_routers,
    check_budget_record,
    check_export_target,
    export_model,
    legacy_budget_state,
)
from zeda_lightning.routing import RoutingVariant, routing_from_config


# -- which strategy -------------------------------------------------------------------------------------------
def strategy_kind(trainer) -> str | None:
    """``"fsdp2"`` (ModelParallelStrategy), ``"fsdp1"`` (FSDPStrategy) or ``None`` (one full copy per process)."""
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp1"
    return None


def check_strategy(trainer, micro_batch: int | None, global_batch: int | None) -> int:
    """Refuse strategy/hardware/batch combinations that cannot run, before any process group exists.

    Returns the gradient-accumulation factor that makes ``global_batch`` (1 when it is not set).
    """
    strategy = trainer.strategy
    world = int(getattr(strategy, "num_nodes", 1) or 1) * max(int(getattr(strategy, "num_processes", 1) or 1), 1)
    if isinstance(strategy, ModelParallelStrategy):
        dp, tp = strategy._data_parallel_size, strategy._tensor_parallel_size
        if tp == "auto" or dp == "auto" or int(tp) != 1 or int(dp) != world:
            raise ValueError(
                f"ModelParallelStrategy(data_parallel_size={dp}, tensor_parallel_size={tp}) on {world} processes: "
                f"zeda shards with FSDP2 only; set trainer.strategy.init_args.data_parallel_size: {world} and "
                "tensor_parallel_size: 1"
            )
    if global_batch is None:
        return 1
    if micro_batch is None or global_batch % (world * micro_batch):
        raise ValueError(
            f"global_batch_size={global_batch} is not a multiple of world size {world} x data.batch_size "
            f"{micro_batch}; pick data.init_args.batch_size and trainer.devices / num_nodes so that it divides "
            f"(e.g. batch_size {max(global_batch // world, 1)} with accumulation 1)"
        )
    accumulate = global_batch // (world * micro_batch)
    if trainer.accumulate_grad_batches not in (1, accumulate):
        raise ValueError(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} contradicts global_batch_size="
            f"{global_batch} ({world} processes x batch {micro_batch} needs {accumulate}); drop one of the two"
        )
    return accumulate


def data_parallel_mesh(module) -> Any:
    """The 1-D data-parallel mesh when the LightningModule runs under ModelParallelStrategy, else ``None``."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or strategy_kind(trainer) != "fsdp2":
        return None
    return trainer.strategy.device_mesh["data_parallel"]


def param_dtypes(trainer) -> tuple[torch.dtype, torch.dtype | None]:
    """``(storage dtype, compute dtype or None)`` from the trainer's precision flag."""
    precision = str(getattr(trainer, "precision", "32-true"))
    if precision == "bf16-true":
        return torch.bfloat16, None
    if precision == "bf16-mixed":
        return torch.float32, torch.bfloat16
    return torch.float32, None


# -- building on the meta device ---------------------------------------------------------------------------
@contextlib.contextmanager
def params_on_meta():
    """Parameters go to the meta device as they are registered; buffers (rotary tables, ...) stay real.

    ``torch.device("meta")`` would also make the non-persistent buffers meta, and they are in no checkpoint.
    """
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _config(path_or_config):
    config = (AutoConfig.from_pretrained(path_or_config, trust_remote_code=False) if isinstance(path_or_config, str)
              else path_or_config)
    saved = getattr(config, CONFIG_KEY, None)
    if saved is not None:
        config = copy.deepcopy(config)
        delattr(config, CONFIG_KEY)
    return config, saved


def build_empty(path_or_config, routing: RoutingVariant | None = None, reader: "SafetensorsReader | None" = None):
    """The model of a transformers directory (or config) with meta parameters.

    A saved zeda model comes back with its routers (rows to be filled from the checkpoint). ``routing`` on an
    original model injects it with the same row init as the unsharded path, which needs the original router rows:
    they are read from ``reader`` (a few MB per layer) and the grown routers are real tensors on return. A given
    ``reader`` reads this model's tensor names from then on (:meth:`SafetensorsReader.attach`).
    """
    config, saved = _config(path_or_config)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if reader is not None:
        reader.attach(model)
    if saved is not None:
        inject(model, routing_from_config(saved, where="config.json zeda_routing"), init=False)
    elif routing is not None:
        if reader is None:
            raise ValueError("injecting routing into an empty model needs the original router rows: pass reader")
        adapter = adapter_for(model)
        for name, block in adapter.find_blocks(model):
            getattr(block, adapter.router_attr).to_empty(device="cpu")
            with torch.no_grad():  # the router's tensors, and those its family keeps in the block (LFM2's bias)
                for key, t in adapter.original_state(block).items():
                    t.copy_(reader.rows(f"{name}.{key}", 0, t.shape[0] if t.dim() else 0, t.shape))
        inject(model, routing)
    return model


# -- reading a checkpoint shard by shard ----------------------------------------------------------------------
class SafetensorsReader:
    """Rows ``[start, stop)`` of any tensor of a transformers safetensors checkpoint, read without loading the rest.

    Once attached to the model it fills (:meth:`attach`, which ``build_empty`` does), tensors are named as the model
    names them: checkpoint keys go through transformers' own conversion mapping for the family
    (:class:`~zeda_lightning.checkpoint_keys.CheckpointKeys`), so per-expert tensors (Qwen's
    ``experts.{e}.gate_proj``..., Mixtral's ``block_sparse_moe.experts.{e}.w1/w2/w3``) are stacked on the fly into
    transformers 5's fused 3-D parameters, reading only the experts of the requested rows. Original hub checkpoints
    and this package's exports read alike.
    """

    def __init__(self, path: str) -> None:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ValueError(f"{path} has no *.safetensors weight files")
        self.path = path
        self._handles = {f: safe_open(f, framework="pt") for f in files}
        self._where = {key: f for f, h in self._handles.items() for key in h.keys()}
        self._keys: CheckpointKeys | None = None

    def attach(self, model: nn.Module) -> SafetensorsReader:
        """Read tensors by ``model``'s names from now on (its family's key conversion); the first model wins."""
        if self._keys is None:
            self._keys = CheckpointKeys(model, self._where)
        return self

    def __contains__(self, key: str) -> bool:
        return key in self._keys if self._keys is not None else key in self._where

    def _read(self, key: str, start: int | None, stop: int | None) -> Tensor:
        """Rows ``start:stop`` of the checkpoint tensor ``key`` (all of it when ``start`` is None, or 0-d)."""
        s = self._handles[self._where[key]].get_slice(key)
        if not s.get_shape():
            return self._handles[self._where[key]].get_tensor(key)
        return s[:] if start is None else s[start:stop]

    def rows(self, key: str, start: int, stop: int, shape: torch.Size) -> Tensor:
        """Rows ``start:stop`` of ``key`` (dim 0), checked against the expected local ``shape``."""
        if self._keys is not None and key in self._keys:
            t = self._keys.read(key, self._read, start, stop)
        elif self._keys is None and key in self._where:
            t = self._read(key, start, stop)
        else:
            raise ValueError(
                f"{self.path}: no tensor {key} in the checkpoint, nor the checkpoint tensors transformers' conversion "
                "mapping for this family makes it from; the checkpoint does not belong to this config"
            )
        if tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"{self.path}: tensor {key} rows {start}:{stop} have shape {tuple(t.shape)}, the model expects "
                f"{tuple(shape)}; the checkpoint does not belong to this config (or to this routing config)"
            )
        return t


def _local_rows(t: Tensor) -> tuple[Tensor, int, int]:
    """``(local tensor to write into, start, stop)`` of ``t`` along dim 0 (the whole tensor unless sharded)."""
    if not isinstance(t, DTensor):
        return t, 0, t.shape[0] if t.dim() else 0
    if len(t.placements) != 1 or t.placements[0] != Shard(0):
        raise ValueError(f"only FSDP's Shard(0) placement is supported, got {t.placements}")
    local = t.to_local()
    n, world = t.shape[0], t.device_mesh.size()
    chunk = -(-n // world)  # torch.chunk's split, as FSDP2 shards
    start = min(t.device_mesh.get_local_rank() * chunk, n)
    return local, start, start + local.shape[0]


@torch.no_grad()
def fill(model: nn.Module, reader: SafetensorsReader, device: torch.device, keep: dict[str, Tensor] | None = None) -> None:
    """Materialise a (sharded) meta model on ``device``: each rank reads its rows of each tensor, one at a time.

    ``keep``: full tensors already computed on this rank (non-persistent buffers, freshly grown routers), sliced
    instead of read. Tied parameters are filled once, under their first name.
    """
    keep = keep or {}
    model.to_empty(device=device)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    seen: set[int] = set()
    for name, t in tensors.items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        local, start, stop = _local_rows(t)
        src = keep[name][start:stop] if name in keep and keep[name].dim() else keep.get(name)
        if src is None:
            src = reader.rows(name, start, stop, local.shape)
        local.copy_(src)  # cast to the storage dtype here, one tensor at a time


def cast_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Storage dtype of the parameters; buffers (router correction biases, rotary tables) keep theirs."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def shard(model: nn.Module, mesh, *, compute_dtype: torch.dtype | None = None, activation_checkpointing: bool = False,
          reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every decoder layer, the input embeddings and the output head (each its own unit unless
    tied), then the root (final norm and the rest), with FSDP2.

    Embeddings and head as units of their own are gathered one at a time (the embeddings at the start of the
    forward, the head at its end): with a 150k vocabulary each is as large as a whole MoE layer, and a root unit
    holding both would keep both gathered through the whole forward.
    """
    units = fsdp_units(model)  # refuses a model without decoder layers before anything changes
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else MixedPrecisionPolicy()
    for unit in units:  # inner units first, the root last
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # transformers' generate then keeps every rank stepping until all are done (synced_gpus), as FSDP needs
    model._is_fsdp_managed_module = True
    return model


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules ``shard`` wraps, the root last: each decoder layer, the input embeddings and the output head
    (each its own unit unless tied, then both stay in the root)."""
    units = list(decoder_layers(model))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    if embed is not None and not tied:
        units += [embed, head] if head is not None else [embed]
    return units + [model]


def enable_activation_checkpointing(model: nn.Module) -> None:
    """transformers' own per-decoder-layer checkpointing, non-reentrant (it runs inside FSDP's hooks)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__}: no decoder layers at get_decoder().layers to shard one by one")
    return layers


def load_sharded(path: str, mesh, *, routing: RoutingVariant | None = None, dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype | None = None, activation_checkpointing: bool = False,
                 configure=None) -> nn.Module:
    """Build ``path``'s model (``routing`` injected unless it is a zeda export) sharded over ``mesh``.

    ``configure(model)`` runs on the meta model before sharding (e.g. ``requires_grad`` per trainable preset).
    A zeda export's compute budget comes from its weights (the routers' ``zero_logit_bias`` buffers), or, for an
    export written before they were saved there, from its ``config.zeda_budget`` record, as ``from_pretrained`` does.
    """
    where = os.path.join(path, "config.json")
    reader = SafetensorsReader(path)
    fresh = routing is not None and CONFIG_KEY not in read_config(path)
    model = build_empty(path, routing=routing if fresh else None, reader=reader)
    state = model.state_dict()
    keep = {n: b.detach().clone() for n, b in model.named_buffers() if n not in state}  # non-persistent
    if fresh:  # grown routers: computed here from the original rows, exactly as the unsharded path does
        keep.update({k: state[k].detach().clone() for k in routing_state_keys(model)})
    else:
        keep.update(legacy_budget_state(model, reader, where))
    cast_params(model, dtype)
    if configure is not None:
        configure(model)
    shard(model, mesh, compute_dtype=compute_dtype, activation_checkpointing=activation_checkpointing)
    device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device(mesh.device_type)
    fill(model, reader, device, keep)
    check_budget_record(model, where)
    return model


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every FSDP2 unit of ``model`` unsharded inside the block (collective: all ranks enter it)."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    try:
        yield model
    finally:
        for m in reversed(units):
            m.reshard()


@contextlib.contextmanager
def unsharded_for_generation(model: nn.Module):
    """The whole FSDP2 ``model`` gathered once for a generation loop (collective: all ranks enter it).

    Inside, no forward all-gathers or reshards, so each rank decodes its own prompts without collectives (pass
    ``synced_gpus=False`` to ``generate``); on exit every unit reshards after forward again, as ``shard`` built it.
    Parameters are in the compute dtype while gathered (the mixed-precision policy's), exactly as in a forward.
    """
    model.set_reshard_after_forward(False)
    try:
        with gathered(model):
            yield model
    finally:
        model.set_reshard_after_forward(True)


def _available_bytes(device: torch.device) -> int:
    """Free memory one process may use: the device's free memory, or on CPU the host's available memory split
    between the processes of this node."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def unsharded_bytes(model: nn.Module, compute_dtype: torch.dtype | None = None) -> int:
    """Bytes the gathered parameters of ``model`` take beside this rank's shards (in ``compute_dtype``, the
    mixed-precision policy's, else their storage dtype): FSDP2 unshards into new full-size tensors, so a rank's own
    shard is held twice while gathered."""
    return sum(p.numel() * (compute_dtype or p.dtype).itemsize for p in model.parameters() if isinstance(p, DTensor))


def fits_unsharded(model: nn.Module, compute_dtype: torch.dtype | None = None, headroom: float = 0.75) -> bool:
    """Whether every rank can hold ``model`` gathered within ``headroom`` of its free memory (the same answer on
    all ranks: the smallest margin decides)."""
    device = next(p.device for p in model.parameters())
    need = unsharded_bytes(model, compute_dtype)
    margin = torch.tensor([headroom * _available_bytes(device) - need], dtype=torch.float64,
                          device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(margin, op=torch.distributed.ReduceOp.MIN)
    return bool(margin.item() >= 0)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


# -- back to one transformers directory ---------------------------------------------------------------------
def _assemble(config, state: dict[str, Tensor]) -> nn.Module:
    """An ordinary (unsharded) model holding ``state``: meta build, then the tensors assigned without copies."""
    model = build_empty(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    params = dict(model.named_parameters())
    bad = [k for k in missing if k in params and k not in tied]
    if bad or unexpected:
        raise ValueError(f"state does not match the config: missing {bad[:5]}, unexpected {list(unexpected)[:5]}")
    model.tie_weights()
    return model.eval()


def gather_for_export(model: nn.Module, rank: int) -> nn.Module | None:
    """Collective: the full model on CPU on rank 0 (``None`` on the others), ready for ``export_model``."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _assemble(model.config, state) if rank == 0 else None


def checkpoint_hparams(ckpt_path: str) -> dict[str, Any]:
    """Hyperparameters stored in a Lightning checkpoint (a file, or a distributed checkpoint directory), read with
    ``weights_only=True`` (and the distributed metadata with the restricted unpickler): plain data, never calls."""
    hp = checkpoint_meta(ckpt_path).get("hyper_parameters", {})
    return dict(hp) if isinstance(hp, dict) else {}


def consolidate(ckpt_dir: str, out_dir: str, *, overwrite: bool = False, model_dir: str | None = None) -> str:
    """Turn the student of a sharded (distributed) Lightning checkpoint into a transformers directory.

    Runs in one process without a process group: the student is rebuilt from the checkpoint's hyperparameters on
    the meta device, materialised on CPU and filled by ``torch.distributed.checkpoint``; written atomically. A
    checkpoint written before the routers' zero-logit bias was a buffer leaves it at 0 (its value in training).
    ``model_dir`` replaces the model directory the run recorded (its config and tokenizer), e.g. when that was a
    relative path of another working directory.
    """
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"{ckpt_dir} is not a distributed checkpoint directory (a single-file checkpoint holds "
                         "the full state already: load it with torch.load)")
    hp = checkpoint_hparams(ckpt_dir)
    source = hp.get("student") or hp.get("teacher")
    if not isinstance(source, str) or not isinstance(hp.get("routing"), dict):
        raise ValueError(f"{ckpt_dir}: no student/teacher/routing hyperparameters; it is not a ZedaDistillModule run")
    if model_dir is not None:
        source = model_dir
    if not os.path.isfile(os.path.join(source, "config.json")):
        where = "" if os.path.isabs(source) else f" (a relative path, read from {os.getcwd()})"
        raise ValueError(f"{ckpt_dir} was trained from {source!r}, which has no config.json here{where}; run "
                         "consolidate from the directory fit ran in, or pass --model_dir DIR (that model's directory)")
    check_export_target(out_dir, overwrite, protected=[ckpt_dir, source])
    routing = routing_from_config(hp["routing"], where=f"{ckpt_dir} hyperparameters")
    config, _ = _config(source)
    model = build_empty(config)
    inject(model, routing, init=False)
    persistent = set(model.state_dict())
    keep = {n: b.clone() for n, b in model.named_buffers() if n not in persistent}  # rotary tables: in no checkpoint
    model.to_empty(device="cpu")
    state = {f"student.{k}": v for k, v in model.state_dict().items()}
    saved = read_dcp_metadata(ckpt_dir).state_dict_metadata
    for key in budget_routers(model):  # a checkpoint from before the bias was a buffer: 0, as in training
        if f"state_dict.student.{key}" not in saved:
            del state[f"student.{key}"]
            keep[key] = torch.zeros((), dtype=torch.float32)
    dcp.load({"state_dict": state}, storage_reader=safe_filesystem_reader(ckpt_dir), no_dist=True)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in keep:
                b.copy_(keep[name])
    model.tie_weights()
    tok = (AutoTokenizer.from_pretrained(source, trust_remote_code=False)
           if os.path.isfile(os.path.join(source, "tokenizer_config.json")) else None)
    return export_model(model.eval(), out_dir, tok, overwrite=overwrite, protected=[ckpt_dir, source])


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def consolidate_main(ckpt: str, out: str, overwrite: bool = False, model_dir: str | None = None) -> str:
    """Turn the student of a sharded (distributed) checkpoint into a transformers directory.

    Returns the directory's path.

    Args:
        ckpt: distributed checkpoint directory (e.g. runs/x/checkpoints/last.ckpt).
        out: transformers directory to write the student to.
        overwrite: replace a non-empty ``out``.
        model_dir: the model directory the run started from (default: the one it recorded, which a relative path
            resolves from the working directory).
    """
    return consolidate(ckpt, out, overwrite=overwrite, model_dir=model_dir)
