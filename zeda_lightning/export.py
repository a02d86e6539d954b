"""Save and rebuild models in transformers format, atomically, with the routing choice in ``config.json``.

``export_model`` writes into a temporary sibling directory and renames it into place, so a crash never leaves a
half-written export. ``from_pretrained`` rebuilds the family's model plus the injected routers from
``config.zeda_routing`` with no remote code, and refuses pickle weight files.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile

import torch
from torch import nn

from zeda_lightning.adapters import CONFIG_KEY, inject
from zeda_lightning.routing import routing_from_config

_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _check_export_target(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"export path {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"export directory {out_dir} exists and is not empty; pass overwrite=True to replace it")


def export_model(model: nn.Module, out_dir: str, tokenizer=None, *, overwrite: bool = False, state_dict=None) -> str:
    """Write ``model`` (and ``tokenizer``) as a transformers directory at ``out_dir``, atomically.

    A model with zero-expert routers gets its live zero-logit biases (the compute budget) into ``config.json``, so
    the export reloads to the same model.
    """
    from zeda_lightning.budget import sync_budget_config

    _check_export_target(out_dir, overwrite)
    sync_budget_config(model)
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary directory
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_model_dir(path: str, *, require_routing: bool = False, require_tokenizer: bool = False) -> dict:
    """Validate a transformers directory without loading weights; returns its ``config.json`` as a dict.

    ``require_routing``: the config must carry ``zeda_routing`` (a zeda export, not a plain model).
    ``require_tokenizer``: tokenizer files must be there (generation, calibration, evaluation).
    """
    if not os.path.isdir(path):
        raise ValueError(f"model directory not found: {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path} has no config.json; point to a transformers model directory")
    if not glob.glob(os.path.join(path, "*.safetensors")):
        pickles = [p for pat in _PICKLE_PATTERNS for p in glob.glob(os.path.join(path, pat))]
        if pickles:
            raise ValueError(
                f"{path} holds only pickle weight files {sorted(os.path.basename(p) for p in pickles)}; they are "
                "refused (arbitrary code on load). Convert them to safetensors first."
            )
        raise ValueError(f"{path} has no *.safetensors weight files")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = set(json.load(f).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not os.path.isfile(os.path.join(path, s)))
        if missing:
            raise ValueError(f"{path}: model.safetensors.index.json lists shards that are missing: {missing[:5]}; "
                             "copy the whole directory")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from err
    if require_routing and CONFIG_KEY not in cfg:
        raise ValueError(
            f"{path}: config.json has no {CONFIG_KEY!r} field, so it is not a zeda export (no zero-expert routers). "
            "Export a distilled student (`python -m zeda_lightning fit --config configs/tiny.yaml` writes one) or "
            "inject(model, ZeroExperts()) and export_model(...)"
        )
    if require_tokenizer and not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise ValueError(f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); export the model with its "
                         "tokenizer (export_model(model, out, tokenizer))")
    return cfg


def _checkpoint_key_renamer(model: nn.Module):
    """Checkpoint key -> module key with transformers' own renamings for the family (e.g. Mixtral saves
    ``block_sparse_moe.gate`` for the module ``mlp.gate``); identity where transformers has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # older/newer layout: keys are saved as the modules name them
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    return lambda key: rename_source_key(key, renamings, converters)[0]


def _load_tensors(path: str, keys: list[str], model: nn.Module) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    rename = _checkpoint_key_renamer(model)
    wanted, found = set(keys), {}
    for shard in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(shard, framework="pt") as f:
            for saved in f.keys():
                key = saved if saved in wanted else rename(saved)
                if key in wanted:
                    found[key] = f.get_tensor(saved)
    return found


def from_pretrained(path: str, *, dtype: torch.dtype | None = torch.float32, require_routing: bool = False) -> nn.Module:
    """Load a causal LM from ``path``; a model saved with injected routing comes back with the same routers (and
    the compute budget recorded in ``config.zeda_budget``), with no remote code and no pickle files.

    transformers loads everything it knows (with its own checkpoint conversions, e.g. per-expert weights fused into
    3D tensors); the grown or added router tensors are then read from the safetensors files by key.
    ``require_routing``: refuse a plain model (no ``zeda_routing`` in its config).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from zeda_lightning.adapters import routing_state_keys
    from zeda_lightning.budget import apply_budget_config

    cfg = check_model_dir(path, require_routing=require_routing)
    if CONFIG_KEY not in cfg:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).eval()
    config = AutoConfig.from_pretrained(path)
    routing = routing_from_config(getattr(config, CONFIG_KEY))
    delattr(config, CONFIG_KEY)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the router shapes differ on purpose; they are filled right below
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, use_safetensors=True, ignore_mismatched_sizes=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    inject(model, routing, init=False)
    keys = routing_state_keys(model)
    state = _load_tensors(path, keys, model)
    missing = sorted(set(keys) - set(state))
    if missing:
        raise ValueError(f"{path}: routing config {routing} needs tensors missing from the checkpoint: {missing[:5]}")
    model.load_state_dict(state, strict=False)
    apply_budget_config(model, where=os.path.join(path, "config.json"))
    return model.eval()
