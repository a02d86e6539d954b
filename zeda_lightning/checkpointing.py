"""Checkpoints that survive kills, full disks and hostile files.

Lightning writes a single-file checkpoint through ``fsspec``'s local transaction, which stages the bytes in the
system temporary directory and *moves* them over: across filesystems that is a copy, and a full disk leaves a
truncated ``last.ckpt``. A distributed checkpoint is written into its directory in place. Here:

- :class:`AtomicCheckpointIO` writes next to the target, fsyncs and renames (atomic on the target filesystem);
- :func:`make_checkpoints_atomic` wires it into a trainer, and stages distributed checkpoints in a sibling
  directory that replaces the old one only once every rank has written;
- :func:`resolve_last` picks the newest *complete* ``last*`` checkpoint (a truncated one is skipped, named);
- every read is ``weights_only=True``; a distributed checkpoint's ``.metadata`` (a pickle torch reads with plain
  ``pickle.load``) is first read with an unpickler that admits only the checkpoint metadata classes.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import importlib
import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import FileSystemReader

from zeda_lightning.fsio import atomic_write, fsync_replace, remove_write_leftovers
from zeda_lightning.routing.base import routing_from_config

_DCP_METADATA = ".metadata"
_STAGING = ".{name}.zeda-staging"  # a distributed checkpoint being written
_PREVIOUS = ".{name}.zeda-previous"  # the one it replaces, until the swap is done


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, fsync, rename; reads are ``weights_only``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        remove_write_leftovers(path)  # of a save that was killed (the run lock makes this process the only writer)
        with atomic_write(path, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return torch.load(os.fspath(path), map_location=map_location or "cpu", weights_only=True)


def make_checkpoints_atomic(trainer) -> None:
    """Make every checkpoint ``trainer`` writes atomic on its filesystem (see the module docstring)."""
    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy) and strategy._save_distributed_checkpoint:
        if not getattr(strategy.save_checkpoint, "_zeda_atomic", False):
            strategy.save_checkpoint = _staged_directory_save(strategy, strategy.save_checkpoint)
        return
    if type(strategy.checkpoint_io) is TorchCheckpointIO or strategy._checkpoint_io is None:
        strategy.checkpoint_io = AtomicCheckpointIO()


def _staged_directory_save(strategy, save):
    """Every rank writes its shards into a staging directory; rank 0 then swaps it in for the old checkpoint."""

    def staged(checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        path = Path(filepath).absolute()
        staging = path.with_name(_STAGING.format(name=path.name))
        previous = path.with_name(_PREVIOUS.format(name=path.name))
        if strategy.is_global_zero and staging.exists():
            shutil.rmtree(staging)  # our own leftover of a save that was killed
        strategy.barrier("zeda-staging-clean")
        save(checkpoint, staging, storage_options)
        strategy.barrier("zeda-staging-written")
        if strategy.is_global_zero:
            if previous.exists():
                shutil.rmtree(previous)
            if path.is_dir():
                os.replace(path, previous)
            elif path.exists():
                path.unlink()
            fsync_replace(str(staging), str(path))
            shutil.rmtree(previous, ignore_errors=True)
        strategy.barrier("zeda-staging-swapped")

    staged._zeda_atomic = True
    return staged


def recover_staged(path: str) -> None:
    """A kill between the two renames of a distributed save leaves the previous checkpoint under its hidden
    name: put it back (the staging copy may be incomplete, so it is removed)."""
    p = Path(path)
    previous = p.with_name(_PREVIOUS.format(name=p.name))
    if not p.exists() and previous.is_dir():
        os.replace(previous, p)
    staging = p.with_name(_STAGING.format(name=p.name))
    if staging.exists() and staging.is_dir():
        shutil.rmtree(staging, ignore_errors=True)


# -- reading ------------------------------------------------------------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what ``torch.distributed.checkpoint`` writes into ``.metadata``: its dataclasses, sizes,
    dtypes, layouts and paths. Anything else (``os.system``, ``builtins.eval``...) is refused, not called."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint._extension", "torch.distributed.checkpoint.planner")

    def find_class(self, module: str, name: str):
        if module in self._MODULES:
            # NOTE: only a plain name (pickle resolves "a.b" attribute by attribute: "os.system" would reach the
            # module's imports) naming a dataclass or enum defined in that very module: constructing one calls
            # nothing but its field assignments.
            obj = getattr(importlib.import_module(module), name, None) if "." not in name else None
            if (isinstance(obj, type) and obj.__module__ == module
                    and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))):
                return obj
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                                               torch.memory_format))):
            return getattr(torch, name)
        if (module, name) in {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "Path"),
                              ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_dcp_metadata(ckpt_dir: str):
    """The ``.metadata`` of a distributed checkpoint, read without calling anything it names."""
    path = os.path.join(ckpt_dir, _DCP_METADATA)
    if not os.path.isfile(path):
        raise ValueError(f"{ckpt_dir} is not a distributed checkpoint (no {_DCP_METADATA} in it)")
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(io.BytesIO(f.read())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: refused ({err}); this is not a checkpoint this package or Lightning wrote "
                         "(or it is corrupt)") from err


def safe_filesystem_reader(ckpt_dir: str):
    """A ``torch.distributed.checkpoint`` reader whose metadata read is the restricted one above."""
    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_dcp_metadata(str(self.path))
            if getattr(metadata, "storage_meta", None) is not None:
                metadata.storage_meta.load_id = self.load_id
            return metadata

    return _Reader(ckpt_dir)


def _load_file(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused by torch.load(weights_only=True): it holds objects other than tensors and "
                         f"plain data, which could run code ({str(err).splitlines()[0]})") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt: {err})") from err


def checkpoint_meta(path: str) -> dict:
    """The non-tensor part of a Lightning checkpoint (file, or distributed checkpoint directory):
    hyperparameters, step, loops; read with ``weights_only=True``."""
    if os.path.isdir(path):
        meta = os.path.join(path, _METADATA_FILENAME)
        if not os.path.isfile(meta):
            raise ValueError(f"{path} is not a Lightning checkpoint (no {_METADATA_FILENAME} in it)")
        read_dcp_metadata(path)  # refuse a hostile .metadata before anything reads it with plain pickle
        return _load_file(meta)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}")
    ckpt = _load_file(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def checkpoint_shapes(path: str, loaded: dict | None = None) -> dict[str, tuple[int, ...]]:
    """``{state_dict key: shape}`` of a checkpoint, without reading tensor data (``loaded``: what
    :func:`checkpoint_meta` already returned for a single file, so it is not loaded twice)."""
    if os.path.isdir(path):
        md = read_dcp_metadata(path)
        prefix = "state_dict."
        return {k[len(prefix):]: tuple(v.size) for k, v in md.state_dict_metadata.items()
                if k.startswith(prefix) and hasattr(v, "size")}
    state = (loaded if loaded is not None else checkpoint_meta(path))["state_dict"]
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_fits(path: str, meta: dict, routing: dict | None, expected: dict[str, tuple[int, ...]], prefix: str,
               model: str, role: str = "model") -> list[str]:
    """Refuse a checkpoint of another model before anything is written: its saved routing config (a
    ``hyper_parameters.routing`` entry, resolved through the registry only) must equal ``routing``, and its
    ``prefix``-ed tensors must have the ``expected`` names and shapes (``model`` names the configured model in the
    error, as the configured ``role``). Returns the expected names the checkpoint lacks that end in a legacy buffer
    suffix (those are not refused)."""
    hparams = meta.get("hyper_parameters") or {}
    saved = hparams.get("routing") if isinstance(hparams, dict) else None
    if saved is not None:
        try:
            saved = routing_from_config(saved, where=f"checkpoint {path}").to_config()
        except ValueError as err:
            raise ValueError(f"{err}; resume only from checkpoints of this package's runs") from err
    if saved is not None and routing is not None and saved != routing:
        raise ValueError(f"checkpoint {path} was trained with routing {saved}, but this run asks for {routing}; "
                         "resume with the routing config it was trained with, or start a new run without --ckpt_path")
    found = {k: v for k, v in checkpoint_shapes(path, meta).items() if k.startswith(prefix)}
    wrong = [(k, found[k], expected[k]) for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    legacy = [k for k in missing if k.endswith(LEGACY_BUFFERS)]
    missing = [k for k in missing if k not in legacy]
    if wrong or missing or extra:
        what = (f"{wrong[0][0]} has shape {wrong[0][1]} there, this run's model {wrong[0][2]}" if wrong else
                f"tensors missing from it: {missing[:3]}" if missing else f"tensors this model lacks: {extra[:3]}")
        raise ValueError(f"checkpoint {path} does not fit the configured {role} ({model}): {what}; resume with the "
                         "model it was trained with")
    return legacy


#: buffers added to the model after checkpoints were written without them, restored at their defaults: the routers'
#: zero-logit budget (0 in training), which became a weight
LEGACY_BUFFERS = (".zero_logit_bias",)


def is_complete(path: str) -> bool:
    """Does ``path`` hold a whole checkpoint (a kill or a full disk while writing leaves a partial one)?"""
    try:
        if os.path.isdir(path):
            checkpoint_meta(path)
            return any(f.endswith(".distcp") for f in os.listdir(path))
        with zipfile.ZipFile(path) as z:  # torch.save's format: a truncated file has no central directory
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
    except (ValueError, OSError, zipfile.BadZipFile, RuntimeError):
        return False


def resolve_last(dirpaths: list[str]) -> tuple[str | None, list[str]]:
    """The newest complete ``last*`` checkpoint in ``dirpaths`` and the incomplete ones skipped on the way."""
    for d in dirpaths:
        recover_staged(os.path.join(d, "last.ckpt"))
    found = [p for d in dirpaths for p in glob.glob(os.path.join(glob.escape(d), "last*.ckpt"))]
    skipped = []
    for path in sorted(found, key=os.path.getmtime, reverse=True):
        if is_complete(path):
            return path, skipped
        skipped.append(path)
    return None, skipped


def check_finite_state(tensors, what: str) -> None:
    """Raise naming the first tensor of ``tensors`` ``{name: Tensor}`` with a NaN or inf (local shards)."""
    for name, t in tensors:
        if t is None or not torch.is_floating_point(t):
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.numel() and not bool(torch.isfinite(local).all()):
            raise FloatingPointError(f"{what}: tensor {name} holds NaN or inf")


__all__ = [
    "AtomicCheckpointIO",
    "check_finite_state",
    "checkpoint_meta",
    "checkpoint_shapes",
    "is_complete",
    "make_checkpoints_atomic",
    "read_dcp_metadata",
    "recover_staged",
    "resolve_last",
    "safe_filesystem_reader",
]
