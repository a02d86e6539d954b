"""Real-architecture slices: a published MoE model's own ``config.json`` with ``num_hidden_layers`` cut to its dense
prefix plus a few MoE layers, every other size real, random bf16 weights saved in the hub's layout.

``python -m zeda_lightning slice --model qwen3_30b_a3b --out /tmp/qwen3_slice`` writes, from the shipped
``assets/configs/<name>/config.json`` (nothing is downloaded): sharded safetensors ``model-0000k-of-0000N.safetensors``
under the hub's tensor names (one ``mlp.experts.{i}.{gate,up,down}_proj.weight`` per expert, which transformers 5
fuses at load time by its conversion mapping), ``model.safetensors.index.json``, the cut ``config.json``, a
``generation_config.json``, the tiny tokenizer of ``assets/tiny_teacher`` and a ``zeda_slice.json`` marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from zeda_lightning.fsio import atomic_dir, atomic_write

from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

#: the repository's ``assets`` folder: the shipped real configs and the tiny tokenizer
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
#: the shipped real-model configs, by name
REAL_CONFIGS = {name: os.path.join(ASSETS, "configs", name, "config.json") for name in ("qwen3_30b_a3b", "glm_4_7_flash")}
#: the tokenizer files copied into a slice (vocabulary 2048, smaller than the real models')
TOKENIZER_DIR = os.path.join(ASSETS, "tiny_teacher")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
#: the marker a slice directory carries; only a directory with it is ever replaced
MARKER = "zeda_slice.json"
MARKER_FORMAT = "zeda-slice/1"
_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def resolve_config(config_path_or_name: str | os.PathLike) -> str:
    """The ``config.json`` path of a shipped name (``qwen3_30b_a3b``, ``glm_4_7_flash``), a directory or a file."""
    name = os.fspath(config_path_or_name)
    if name in REAL_CONFIGS:
        return REAL_CONFIGS[name]
    path = os.path.join(name, "config.json") if os.path.isdir(name) else name
    if not os.path.isfile(path):
        raise ValueError(f"{name!r} is neither a shipped config ({', '.join(REAL_CONFIGS)}) nor a config.json")
    return path


def parse_size(size: int | str) -> int:
    """Bytes of ``"2GB"`` (10**9 units, as transformers' ``max_shard_size``), ``"500MiB"`` or an int."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
    if m is None:
        raise ValueError(f"max_shard_size {size!r}: write e.g. '2GB', '500MB' or '1GiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def _is_moe_layer(layer: nn.Module) -> bool:
    return any(name.split(".")[-1] == "experts" for name, _ in layer.named_modules())


def _meta_model(cfg: dict, dtype: torch.dtype) -> nn.Module:
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


def cut_config(cfg: dict, moe_layers: int = 2) -> tuple[dict, int]:
    """``cfg`` (a real ``config.json`` dict) cut to its dense prefix plus ``moe_layers`` MoE layers, and the number
    of dense prefix layers. Which layers are dense is read from the model transformers builds (on the meta device),
    so GLM's ``mlp_layer_types`` / ``first_k_dense_replace`` and Qwen's ``mlp_only_layers`` count as the model does;
    per-layer lists (``layer_types``, ``mlp_layer_types``) are cut to the new length, ``mlp_only_layers`` keeps its
    indices below it and ``max_window_layers`` is capped at it."""
    if moe_layers < 1:
        raise ValueError(f"moe_layers must be at least 1, got {moe_layers}")
    full = cfg["num_hidden_layers"]
    kinds = [_is_moe_layer(layer) for layer in _layers(_meta_model(cfg, torch.bfloat16))]
    dense = kinds.index(True) if True in kinds else full
    if dense == full:
        raise ValueError(f"{cfg.get('model_type')}: no MoE layer in the config")
    n = dense + moe_layers
    if n > full or not all(kinds[dense:n]):
        raise ValueError(f"{cfg.get('model_type')}: layers {dense}..{n - 1} are not all MoE ({kinds[:n]}); "
                         "only a dense prefix followed by MoE layers is sliced")
    out = {}
    for key, value in cfg.items():
        if isinstance(value, list) and len(value) == full:
            value = value[:n]
        out[key] = value
    out["num_hidden_layers"] = n
    if isinstance(out.get("mlp_only_layers"), list):
        out["mlp_only_layers"] = [i for i in out["mlp_only_layers"] if i < n]
    if isinstance(out.get("max_window_layers"), int):
        out["max_window_layers"] = min(out["max_window_layers"], n)
    cut = [_is_moe_layer(layer) for layer in _layers(_meta_model(out, torch.bfloat16))]
    if cut != kinds[:n]:
        raise ValueError(f"{cfg.get('model_type')}: the cut config builds layers {cut}, expected {kinds[:n]}")
    return out, dense


def _unfusers(model: nn.Module) -> list[tuple[str, list[str], int | None]]:
    """(fused target suffix, per-expert source patterns, concat dim of the per-expert tensors or None) for every
    conversion of the family that stacks per-expert tensors (``MergeModulelist(dim=0)``, then an optional
    ``Concatenate``), read from transformers' mapping so the names and orientation are the ones it loads."""
    out = []
    for t in get_model_conversion_mapping(model):
        if not isinstance(t, WeightConverter):
            continue
        ops = list(t.operations)
        targets = t.target_patterns if isinstance(t.target_patterns, list) else [t.target_patterns]
        if (len(targets) != 1 or not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0
                or len(ops) > 2 or (len(ops) == 2 and not isinstance(ops[1], Concatenate))):
            raise NotImplementedError(f"cannot write the hub layout of conversion {t}")
        concat = ops[1].dim - 1 if len(ops) == 2 else None  # per-expert dim (dim 0, the expert, is gone)
        out.append((targets[0], list(t.source_patterns), concat))
    return out


def hub_tensors(model: nn.Module) -> list[tuple[str, tuple[int, ...], str, str]]:
    """The hub checkpoint's tensors of (meta) ``model``: ``(hub name, shape, init, model key)`` in state-dict order,
    the fused expert tensors split back into one tensor per expert and source (``gate_up_proj`` [E, 2I, H] into
    ``experts.{i}.gate_proj.weight`` and ``experts.{i}.up_proj.weight`` [I, H], ``down_proj`` [E, H, I] into
    ``experts.{i}.down_proj.weight``). ``init`` is ``normal``, ``ones`` (norm weights) or ``zeros`` (biases, the
    correction bias). Tied tensors are written once."""
    unfusers = _unfusers(model)
    modules = dict(model.named_modules())
    seen: set[int] = set()
    out = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        owner = modules.get(key.rpartition(".")[0])
        leaf = key.rpartition(".")[2]
        if owner is not None and "norm" in type(owner).__name__.lower() and leaf == "weight":
            init = "ones"
        elif "bias" in leaf:
            init = "zeros"
        else:
            init = "normal"
        for target, sources, concat in unfusers:
            if key.endswith("." + target) or key == target:
                base = key[: len(key) - len(target)]
                shape = list(tensor.shape[1:])
                if concat is not None:
                    shape[concat] //= len(sources)
                for i in range(tensor.shape[0]):
                    for src in sources:
                        out.append((base + src.replace("*", str(i)), tuple(shape), init, key))
                break
        else:
            out.append((key, tuple(tensor.shape), init, key))
    return out


def _generate(name: str, shape: tuple[int, ...], init: str, *, seed: int, std: float, dtype: torch.dtype,
              padding_row: int | None) -> torch.Tensor:
    if init == "ones":
        return torch.ones(shape, dtype=dtype)
    if init == "zeros":
        return torch.zeros(shape, dtype=dtype)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()  # one stream per tensor: order-free, deterministic
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    t = torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=g)
    if padding_row is not None:
        t[padding_row] = 0  # as transformers' _init_weights leaves nn.Embedding's padding_idx row
    return t


def _plan_shards(tensors: list[tuple[str, tuple[int, ...], str, str]], itemsize: int, limit: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for entry in tensors:
        nbytes = itemsize * _numel(entry[1])
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_safetensors(path: str, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                       tensors: Iterator[torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor (never the whole shard in memory): the header from the shapes,
    then each tensor's bytes as ``tensors`` yields it."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = itemsize * _numel(shape)
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_write(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, shape), t in zip(entries, tensors, strict=True):
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{name}: generated {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
            f.write(t.contiguous().view(torch.uint8).numpy().data)


def _check_target(out_dir: str, overwrite: bool) -> None:
    if not os.path.isdir(out_dir):
        if os.path.exists(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        return
    if not os.listdir(out_dir):
        return
    if not os.path.isfile(os.path.join(out_dir, MARKER)):
        raise FileExistsError(f"{out_dir} is not empty and was not written by write_slice (no {MARKER}); "
                              "choose another --out")
    if not overwrite:
        raise FileExistsError(f"{out_dir} already holds a slice; pass overwrite=True (--overwrite) to replace it")


def write_slice(config_path_or_name: str | os.PathLike, out_dir: str | os.PathLike, *, moe_layers: int = 2,
                dtype: torch.dtype = torch.bfloat16, seed: int = 0, max_shard_size: int | str = "2GB",
                overwrite: bool = False) -> str:
    """Write a real-architecture slice of a published MoE model at ``out_dir`` (atomically); returns its path.

    The real ``config.json`` (a shipped name, ``qwen3_30b_a3b`` or ``glm_4_7_flash``, or a path) is cut to the
    model's dense prefix layers plus ``moe_layers`` MoE layers (:func:`cut_config`: Qwen3-30B-A3B has no dense
    layer, GLM-4.7-Flash one); every other size stays real (hidden, experts, FFN, vocabulary, heads, MLA ranks).
    The weights are random and deterministic from ``seed`` (one generator stream per tensor): normal(0,
    ``initializer_range``), norms 1, biases and the correction bias 0, the embedding's padding row 0. The model
    is only built on the meta device and the tensors are generated and written one at a time, so the peak memory
    is about the largest tensor (the embedding), not the model.

    The layout is the published checkpoints': the hub's tensor names with one ``experts.{i}.{gate,up,down}_proj``
    weight per expert (unfused from the model's ``gate_up_proj`` / ``down_proj`` by transformers' own conversion
    mapping, so it loads them back exactly), ``model-0000k-of-0000N.safetensors`` shards of at most
    ``max_shard_size`` (one tensor larger than that gets a shard of its own), ``model.safetensors.index.json``,
    ``config.json`` (the cut config, dtype bfloat16), ``generation_config.json`` (the real token ids). The hub's
    multi-token-prediction layer (GLM's ``num_nextn_predict_layers``), which transformers does not build, is not
    written. The tokenizer is the tiny one of ``assets/tiny_teacher`` (2048 tokens, far fewer than the real
    vocabulary: ids it cannot produce are still valid model inputs), so ``generate`` and training on text run on
    a slice; token ids the model samples beyond the tokenizer's decode to nothing (a config whose vocabulary is
    under 2048 cannot embed the tokenizer's ids).

    A non-empty ``out_dir`` is refused unless it holds a slice (its ``zeda_slice.json`` marker) and
    ``overwrite`` is set; nothing else is ever replaced.
    """
    source = resolve_config(config_path_or_name)
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_target(out_dir, overwrite)
    with open(source, encoding="utf-8") as f:
        raw = f.read()
    cfg, dense = cut_config(json.loads(raw), moe_layers)
    dtype_name = str(dtype).removeprefix("torch.")
    cfg["torch_dtype"] = dtype_name
    cfg["dtype"] = dtype_name
    model = _meta_model(cfg, dtype)
    std = float(model.config.initializer_range)
    pad = model.config.pad_token_id
    embed = model.get_input_embeddings()
    embed_key = next(k for k, t in model.state_dict(keep_vars=True).items() if t is embed.weight)
    entries = hub_tensors(model)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(entries, itemsize, parse_size(max_shard_size))
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    params = sum(_numel(e[1]) for e in entries)

    def tensors(shard: list) -> Iterator[torch.Tensor]:
        for name, shape, init, key in shard:
            row = pad if key == embed_key and isinstance(pad, int) and 0 <= pad < shape[0] else None
            yield _generate(name, shape, init, seed=seed, std=std, dtype=dtype, padding_row=row)

    marker = {"format": MARKER_FORMAT, "source": os.fspath(config_path_or_name),
              "source_sha256": hashlib.sha256(raw.encode()).hexdigest(), "seed": seed, "moe_layers": moe_layers,
              "dense_layers": dense, "dtype": dtype_name}
    generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    with atomic_dir(out_dir, before_swap=lambda: _check_target(out_dir, overwrite)) as tmp:
        for shard, file in zip(shards, names, strict=True):
            _write_safetensors(os.path.join(tmp, file), [(e[0], e[1]) for e in shard], dtype, tensors(shard))
        index = {"metadata": {"total_parameters": params, "total_size": params * itemsize},
                 "weight_map": {e[0]: file for shard, file in zip(shards, names) for e in shard}}
        for file, payload in (("model.safetensors.index.json", index), ("config.json", cfg),
                              ("generation_config.json", generation)):
            with atomic_write(os.path.join(tmp, file)) as f:
                json.dump(payload, f, indent=2, sort_keys=file != "config.json")
                f.write("\n")
        for file in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(TOKENIZER_DIR, file)):
                shutil.copyfile(os.path.join(TOKENIZER_DIR, file), os.path.join(tmp, file))
        with atomic_write(os.path.join(tmp, MARKER)) as f:  # last: a slice with its marker is a whole one
            json.dump(marker, f, indent=2, sort_keys=True)
            f.write("\n")
    return out_dir


def slice_main(model: str, out: str, moe_layers: int = 2, seed: int = 0, overwrite: bool = False) -> dict:
    """Write a real-architecture slice of a MoE model (its real config, few layers, random bf16 weights, hub layout).

    Args:
        model: a shipped real config (qwen3_30b_a3b, glm_4_7_flash) or a path to a config.json (or its folder)
        out: the slice directory to write
        moe_layers: MoE layers kept after the model's dense prefix layers
        seed: the seed of the random weights (the same seed writes the same bytes)
        overwrite: replace a slice already at --out (never any other directory)
    """
    path = write_slice(model, out, moe_layers=moe_layers, seed=seed, overwrite=overwrite)
    with open(os.path.join(path, "model.safetensors.index.json"), encoding="utf-8") as f:
        index = json.load(f)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        layers = json.load(f)["num_hidden_layers"]
    return {"out": path, "layers": layers, "params": index["metadata"]["total_parameters"],
            "bytes": index["metadata"]["total_size"], "shards": len(set(index["weight_map"].values()))}
