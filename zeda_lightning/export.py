"""Save and rebuild models in transformers format, atomically, with the routing choice in ``config.json``.

``export_model`` writes into a hidden temporary sibling directory (``.<name>.tmp-*``, holding an in-progress marker
until it is complete) and renames it into place, so a crash never leaves a half-written export. Every export
carries a ``zeda_export.json`` marker; ``overwrite`` only ever replaces a marked export, never the current working
directory, a parent of it or a path the caller protects (its teacher, student source, checkpoints, logs). Replacing
an export moves the old one aside (``.<name>.old-*``) before the new one is renamed in, so at every instant either
the target or a recoverable marked ``.old-*`` exists; ``recover_export`` (run by ``export_model`` and, when the
directory is missing, by ``check_model_dir`` / ``from_pretrained``) puts it back after a kill and removes marked
leftovers, never anything without a marker. ``from_pretrained`` rebuilds the family's model plus the injected
routers from ``config.zeda_routing`` with no remote code, and refuses pickle weight files and truncated
safetensors files.

The compute budget (the routers' zero-logit biases) travels in the weights, as each zero-expert router's
``zero_logit_bias`` buffer; ``config.json``'s ``zeda_budget`` is a readable record of it, kept true on export. An
export written before the biases were buffers is loaded with the biases its record gives (:func:`legacy_budget_state`).
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import math
import os
import shutil
import socket
import stat
import struct
import tempfile
import warnings
from collections.abc import Container, Iterable

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from zeda_lightning.adapters import CONFIG_KEY, inject, routing_state_keys
from zeda_lightning.checkpoint_keys import CheckpointKeys
from zeda_lightning.fsio import atomic_dir, fsync_path, pid_alive
from zeda_lightning.routing import BaseRouter, routing_from_config
from zeda_lightning.routing.zero_experts import BUDGET_BUFFER, ZeroExpertRouter

_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

EXPORT_MARKER = "zeda_export.json"
EXPORT_FORMAT = "zeda_lightning export"
EXPORT_VERSION = 1
INCOMPLETE_MARKER = ".zeda_export_incomplete"
_INCOMPLETE_FORMAT = "zeda_lightning export (in progress)"
_MAX_MARKER_BYTES = 64 * 1024
_MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors' own limit on the JSON header
#: prefix of the architecture name a zeda export records in ``config.json`` (``ZedaQwen3MoeForCausalLM``): vLLM
#: picks its model class by that name, and the plugin (``zeda_lightning.serving``) registers it; transformers picks
#: its class by ``model_type``, so a plain load is unchanged
SERVING_ARCH_PREFIX = "Zeda"


# --------------------------------------------------------------------------------------------------- markers


def _marker_payload(fmt: str) -> dict:
    return {
        "format": fmt,
        "version": EXPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def _write_json(path: str, payload: dict) -> None:
    # NOTE: a plain write, not fsio.atomic_write: the in-progress marker must exist from its first byte (an atomic
    # write's temporary would leave, on a kill, a staging directory with no marker, which recover_export never
    # deletes), and both markers are written inside the staging directory, which is itself swapped in atomically.
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def _read_marker(path: str) -> dict | None:
    """The JSON object in the regular file ``path`` (no symlink, at most 64 KiB), or ``None``."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        with open(path, "rb") as f:
            raw = f.read(_MAX_MARKER_BYTES + 1)
        if len(raw) > _MAX_MARKER_BYTES:
            return None
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_zeda_export(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a ``zeda_export.json`` marker written by ``export_model``."""
    path = os.fspath(path)
    marker = _read_marker(os.path.join(path, EXPORT_MARKER)) if os.path.isdir(path) else None
    return marker is not None and marker.get("format") == EXPORT_FORMAT


def _is_in_progress(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(os.path.join(path, INCOMPLETE_MARKER)).st_mode)
    except OSError:
        return False


def _busy_elsewhere(path: str) -> int | None:
    """The pid of another live process on this host still writing the temporary export ``path``, if any."""
    for name in (INCOMPLETE_MARKER, EXPORT_MARKER):
        marker = _read_marker(os.path.join(path, name))
        if marker is None:
            continue
        pid = marker.get("pid")
        if marker.get("host") == socket.gethostname() and pid != os.getpid() and pid_alive(pid):
            return pid
        return None
    return None


# ------------------------------------------------------------------------------------------ file-system helpers


def _remove_export(path: str) -> None:
    """Delete a directory this module created (a marked export or temporary). Its marker first becomes the
    in-progress marker, so a kill midway leaves a directory that ``recover_export`` removes but never restores."""
    marker = os.path.join(path, EXPORT_MARKER)
    incomplete = os.path.join(path, INCOMPLETE_MARKER)
    if _read_marker(marker) is not None:
        os.replace(marker, incomplete)
    for entry in os.listdir(path):
        if entry == INCOMPLETE_MARKER:
            continue
        full = os.path.join(path, entry)
        if stat.S_ISDIR(os.lstat(full).st_mode):
            shutil.rmtree(full)
        else:
            os.unlink(full)
    if os.path.lexists(incomplete):
        os.unlink(incomplete)
    os.rmdir(path)


def _siblings(out_dir: str, kind: str) -> list[str]:
    """Real (not symlinked) directories ``.<name>.<kind>-*`` next to ``out_dir``."""
    parent, name = os.path.split(out_dir)
    prefix = f".{name}.{kind}-"
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        full = os.path.join(parent, entry)
        try:
            if stat.S_ISDIR(os.lstat(full).st_mode):
                found.append(full)
        except OSError:
            pass
    return found


def _norm(out_dir: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(out_dir))


def recover_export(out_dir: str | os.PathLike) -> list[str]:
    """Repair what an interrupted ``export_model`` left next to ``out_dir``; returns what it did, for logging.

    When ``out_dir`` is missing and exactly one marked ``.<name>.old-*`` sibling exists (a kill between the two
    renames of an overwrite), it is renamed back to ``out_dir``. Temporary ``.<name>.tmp-*`` and old ``.old-*``
    siblings that carry a zeda marker (finished or in progress) are removed, except a temporary still being
    written by another live process on this host; directories without a marker are never touched.
    """
    out_dir = _norm(out_dir)
    parent, name = os.path.split(out_dir)
    if not name or not os.path.isdir(parent):
        return []
    done: list[str] = []
    olds = _siblings(out_dir, "old")
    if not os.path.lexists(out_dir):
        marked = [o for o in olds if is_zeda_export(o)]
        if len(marked) == 1:
            try:
                os.rename(marked[0], out_dir)
            except OSError as err:
                done.append(f"could not restore {out_dir} from {marked[0]}: {err}")
            else:
                fsync_path(parent)
                done.append(f"restored {out_dir} from {marked[0]} (an overwrite was interrupted)")
            olds.remove(marked[0])
        elif len(marked) > 1:
            done.append(f"kept {len(marked)} previous exports {marked}: which one belongs at {out_dir} is ambiguous; "
                        "rename one to it by hand")
            olds = [o for o in olds if o not in marked]
    tmps = _siblings(out_dir, "tmp")
    for leftover in tmps + olds:
        if not (is_zeda_export(leftover) or _is_in_progress(leftover)):
            continue  # not ours: never deleted
        pid = _busy_elsewhere(leftover) if leftover in tmps else None
        if pid is not None:
            done.append(f"left {leftover}: an export by live process {pid} is writing it")
            continue
        try:
            _remove_export(leftover)
        except OSError as err:
            done.append(f"could not remove leftover {leftover}: {err}")
        else:
            done.append(f"removed leftover {leftover}")
    return done


# ------------------------------------------------------------------------------------------------ the target


def _first_existing_ancestor(path: str) -> str:
    while not os.path.lexists(path):
        up = os.path.dirname(path)
        if up == path:
            break
        path = up
    return path


def _probe_writable(directory: str, out_dir: str) -> None:
    """Create and remove a probe file in ``directory`` (works as root too, where ``os.access`` says yes to
    everything but a read-only mount or pseudo file system still refuses)."""
    if not os.path.isdir(directory):
        raise ValueError(f"cannot create export {out_dir}: {directory} exists and is not a directory; choose "
                         "another export_dir")
    try:
        fd, probe = tempfile.mkstemp(prefix=".zeda_write_probe-", dir=directory)
    except OSError as err:
        raise ValueError(f"cannot write export {out_dir}: directory {directory} is not writable "
                         f"({err.strerror or err}); choose a writable export_dir or fix its permissions") from None
    os.close(fd)
    os.unlink(probe)


def _inside(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it (both real, absolute)."""
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def check_export_target(out_dir: str | os.PathLike, overwrite: bool, protected: Iterable = ()) -> None:
    """Refuse, with a ``ValueError`` and before anything is written, an export target ``export_model`` must not use.

    Refused: a path that exists and is not a directory (or is a symbolic link); a directory that is, or is a parent
    of, the current working directory or any path in ``protected`` (what the run reads or writes: teacher, student
    source, checkpoints, logs); a non-empty directory without ``overwrite``; with ``overwrite``, a non-empty
    directory that is not a zeda export (no ``zeda_export.json``); a target whose parent is not writable.
    """
    out_dir = _norm(out_dir)
    if os.path.islink(out_dir):
        raise ValueError(f"export path {out_dir} is a symbolic link; give the directory it points to "
                         f"({os.path.realpath(out_dir)}) or another export_dir")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"export path {out_dir} exists and is not a directory")
    real = os.path.realpath(out_dir)
    cwd = os.path.realpath(os.getcwd())
    if _inside(cwd, real):
        raise ValueError(f"export directory {out_dir} is the current working directory {cwd} or a parent of it; "
                         "choose another export_dir")
    for p in protected:
        if p is None or os.fspath(p) == "":
            continue
        p_real = os.path.realpath(os.fspath(p))
        if _inside(p_real, real):
            raise ValueError(f"export directory {out_dir} is or contains {os.fspath(p)}, which this run reads or "
                             "writes (teacher, student source, checkpoint or log directory); choose another "
                             "export_dir")
    exists = os.path.isdir(out_dir)
    if exists:
        non_empty = bool(os.listdir(out_dir))
        marked = is_zeda_export(out_dir)
        where = out_dir
    else:  # a kill between the renames of an overwrite: the export is restored before the next one is written
        olds = [o for o in _siblings(out_dir, "old") if is_zeda_export(o)]
        non_empty = marked = len(olds) == 1
        where = olds[0] if olds else out_dir
    if non_empty and not overwrite:
        if where != out_dir:
            raise ValueError(f"export directory {out_dir} is missing but an interrupted overwrite left its previous "
                             f"export at {where}, which is restored first; pass overwrite=True to replace it")
        raise ValueError(f"export directory {out_dir} exists and is not empty; pass overwrite=True to replace it")
    if non_empty and not marked:
        raise ValueError(f"export directory {out_dir} is not an export written by zeda_lightning (no "
                         f"{EXPORT_MARKER}), so overwrite=True will not replace it; choose another export_dir or "
                         "remove it by hand")
    _probe_writable(_first_existing_ancestor(os.path.dirname(out_dir)), out_dir)


_check_export_target = check_export_target  # old private name, kept for existing callers


# ------------------------------------------------------------------------------------------ the budget record

#: key of the compute-budget record in ``model.config`` (so in ``config.json``): readable only, the biases
#: themselves are the routers' ``zero_logit_bias`` buffers in the weights
BUDGET_KEY = "zeda_budget"


def budget_routers(model: nn.Module) -> dict[str, ZeroExpertRouter]:
    """The model's routers holding a zero-logit bias buffer, in layer order, by the buffer's state-dict key (any
    router that keeps the buffer, not only :class:`ZeroExpertRouter` and its subclasses)."""
    found = [(f"{name}.{BUDGET_BUFFER}", m) for name, m in model.named_modules()
             if isinstance(m, BaseRouter) and BUDGET_BUFFER in m._buffers]
    return dict(sorted(found, key=lambda item: item[1].layer_idx))


def record_budget(model: nn.Module, extra: dict | None = None) -> dict:
    """Write ``model.config.zeda_budget``: ``extra`` (e.g. the calibration's target and ratios) plus the layers and
    the routers' live zero-logit biases; returns it."""
    routers = list(budget_routers(model).values())
    entry = dict(extra or {})
    entry.update(layers=[r.layer_idx for r in routers], zero_logit_bias=[float(r.zero_logit_bias) for r in routers])
    setattr(model.config, BUDGET_KEY, entry)
    return entry


def _as_stored(values) -> list[float] | None:
    """A recorded bias list rounded as the float32 buffers hold it (``None`` if it is not a list of numbers)."""
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return torch.tensor(values, dtype=torch.float32).tolist()


def sync_budget_config(model: nn.Module) -> None:
    """Make ``config.zeda_budget`` say what the routers do (``export_model`` calls it, so ``config.json`` reads true):
    a record of the same biases is kept (target, ratios), any other is replaced by the live biases."""
    routers = list(budget_routers(model).values())
    recorded = getattr(model.config, BUDGET_KEY, None)
    live = [float(r.zero_logit_bias) for r in routers]
    if recorded is None and not any(live):
        return
    if (isinstance(recorded, dict) and _as_stored(recorded.get("zero_logit_bias")) == live
            and recorded.get("layers", [r.layer_idx for r in routers]) == [r.layer_idx for r in routers]):
        record_budget(model, recorded)  # the same biases, written as the weights hold them
        return
    # the calibration record (target, ratios) no longer describes these biases: keep only what is true
    record_budget(model, {"source": "set on the routers, not calibrated"})


def _recorded_biases(model: nn.Module, where: str) -> list[float] | None:
    """The biases ``config.zeda_budget`` records, checked against the model's zero-expert layers (errors name the
    field); ``None`` without a record."""
    entry = getattr(model.config, BUDGET_KEY, None)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("zero_logit_bias"), list):
        raise ValueError(f"{where}: {BUDGET_KEY} must be a dict with a 'zero_logit_bias' list, got {entry!r}")
    layers = [r.layer_idx for r in budget_routers(model).values()]
    if entry.get("layers", layers) != layers:
        raise ValueError(f"{where}: {BUDGET_KEY}.layers {entry['layers']!r} do not match the model's zero-expert "
                         f"layers {layers}; recalibrate with `python -m zeda_lightning budget`")
    values = entry["zero_logit_bias"]
    if len(values) != len(layers) or _as_stored(values) is None or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{where}: {BUDGET_KEY}.zero_logit_bias must hold one finite number per zero-expert layer "
                         f"({len(layers)}), got {values}")
    return [float(v) for v in values]


def legacy_budget_state(model: nn.Module, have: Container[str], where: str) -> dict[str, Tensor]:
    """The zero-logit bias buffers of an export written before they were saved in the weights, as state-dict
    entries: the biases its ``config.zeda_budget`` records (0 without a record). Empty when ``have`` (the
    checkpoint's tensors, by model key) holds any of them: the weights say what the budget is then."""
    keys = budget_routers(model)
    if not keys or any(k in have for k in keys):
        return {}
    values = _recorded_biases(model, where) or [0.0] * len(keys)
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in zip(keys, values)}


def check_budget_record(model: nn.Module, where: str) -> None:
    """After a load: the record is checked like any config field, and made to say what the weights hold. A record
    of other biases (``config.json`` edited by hand) loses to the weights, with a warning."""
    recorded = _recorded_biases(model, where)
    live = [float(r.zero_logit_bias) for r in budget_routers(model).values()]
    if recorded is not None and _as_stored(recorded) != live:
        warnings.warn(f"{where}: {BUDGET_KEY} records zero-logit biases {recorded} but the weights hold {live}; the "
                      "weights' are used (the config field is a readable record only)", stacklevel=3)
    sync_budget_config(model)


# ---------------------------------------------------------------------------------------------------- export


def serving_architecture(architecture: str) -> str:
    """The architecture name a zeda export of a model of class ``architecture`` records, for vLLM's registry."""
    return architecture if architecture.startswith(SERVING_ARCH_PREFIX) else SERVING_ARCH_PREFIX + architecture


def _record_serving_architecture(cfg_path: str) -> None:
    """Rename ``architectures`` in a freshly saved ``config.json`` of an injected model (``save_pretrained`` writes
    the transformers class name), so vLLM resolves it to the zeda plugin's class and not to a model with N router
    rows; a plain model's config is left as saved."""
    with open(cfg_path) as f:
        cfg = json.load(f)
    if CONFIG_KEY not in cfg or not cfg.get("architectures"):
        return
    cfg["architectures"] = [serving_architecture(a) for a in cfg["architectures"]]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def export_model(model: nn.Module, out_dir: str, tokenizer=None, *, overwrite: bool = False, state_dict=None,
                 protected: Iterable = ()) -> str:
    """Write ``model`` (and ``tokenizer``) as a transformers directory at ``out_dir``, atomically; returns its
    absolute path.

    The compute budget of zero-expert routers is in the weights (their ``zero_logit_bias`` buffers), so the export
    reloads to the same model; ``config.json`` records it (``zeda_budget``, synced to the live biases).
    ``overwrite`` replaces a previous zeda export only (see ``check_export_target``, which also refuses ``out_dir``
    if it is or contains a path in ``protected``).
    """
    out_dir = _norm(out_dir)
    recover_export(out_dir)
    protected = tuple(protected)
    check_export_target(out_dir, overwrite, protected)
    sync_budget_config(model)
    # fsio.atomic_dir stages in .<name>.tmp-* and swaps: a non-empty out_dir moves aside (still marked) to
    # .<name>.old-* before the new export moves in, so at every instant either out_dir or a marked .old-* that
    # recover_export restores exists; what this module created is removed marker first (_remove_export)
    def recheck() -> None:  # again, just before the swap: training or saving took a while
        check_export_target(out_dir, overwrite, protected)

    with atomic_dir(out_dir, remove=_remove_export, before_swap=recheck) as tmp:
        _write_json(os.path.join(tmp, INCOMPLETE_MARKER), _marker_payload(_INCOMPLETE_FORMAT))
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        _record_serving_architecture(os.path.join(tmp, "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_json(os.path.join(tmp, EXPORT_MARKER), _marker_payload(EXPORT_FORMAT))
        os.unlink(os.path.join(tmp, INCOMPLETE_MARKER))
    return out_dir


# ------------------------------------------------------------------------------------------------ validation


def _check_safetensors(file: str) -> None:
    """Refuse a truncated or corrupt safetensors file from its header alone (no tensor is read)."""

    def bad(detail: str) -> ValueError:
        return ValueError(f"{file} is truncated or corrupt ({detail}); re-download or re-export it")

    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
                raise bad(f"header length {n} does not fit in the file's {size} bytes")
            raw = f.read(n)
    except OSError as err:
        raise ValueError(f"cannot read {file}: {err}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {key!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if size < 8 + n + end:
        raise bad(f"{size} bytes, but its header needs {8 + n + end}")


def check_model_dir(path: str, *, require_routing: bool = False, require_tokenizer: bool = False) -> dict:
    """Validate a transformers directory without loading weights; returns its ``config.json`` as a dict.

    A missing directory is first recovered (``recover_export``: an overwrite killed between its renames).
    ``require_routing``: the config must carry ``zeda_routing`` (a zeda export, not a plain model).
    ``require_tokenizer``: tokenizer files must be there (generation, calibration, evaluation).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        notes = recover_export(path)
        if not os.path.isdir(path):
            hint = f" ({'; '.join(notes)})" if notes else ""
            raise ValueError(f"model directory not found: {path}{hint}")
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
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        _check_safetensors(file)
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


def _load_tensors(path: str, keys: list[str], model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``keys`` (model names) from ``path``'s safetensors files, found through transformers' key
    conversion for the family (``CheckpointKeys``: e.g. Mixtral saves ``block_sparse_moe.gate`` for ``mlp.gate``)."""
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f, framework="pt"))
                   for f in sorted(glob.glob(os.path.join(path, "*.safetensors")))]
        where = {saved: h for h in handles for saved in h.keys()}
        plan = CheckpointKeys(model, where)
        return {key: plan.read(key, lambda saved, start, stop: where[saved].get_tensor(saved))
                for key in keys if key in plan}


def from_pretrained(path: str, *, dtype: torch.dtype | None = torch.float32, require_routing: bool = False) -> nn.Module:
    """Load a causal LM from ``path``; a model saved with injected routing comes back with the same routers and
    compute budget (their zero-logit bias buffers), with no remote code and no pickle files.

    transformers loads everything it knows (with its own checkpoint conversions, e.g. per-expert weights fused into
    3D tensors); the grown or added router tensors are then read from the safetensors files by key. An export
    written before the biases were saved in the weights gets those its ``config.zeda_budget`` records.
    ``require_routing``: refuse a plain model (no ``zeda_routing`` in its config). A missing ``path`` left by an
    overwrite killed between its renames is recovered first (``check_model_dir``).
    """
    cfg = check_model_dir(path, require_routing=require_routing)
    if CONFIG_KEY not in cfg:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=False
        ).eval()
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    routing = routing_from_config(getattr(config, CONFIG_KEY))
    delattr(config, CONFIG_KEY)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the router shapes differ on purpose; they are filled right below
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, use_safetensors=True, ignore_mismatched_sizes=True,
            trust_remote_code=False,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    inject(model, routing, init=False)
    where = os.path.join(path, "config.json")
    keys = routing_state_keys(model)
    state = _load_tensors(path, keys, model)
    state.update(legacy_budget_state(model, state, where))
    missing = sorted(set(keys) - set(state))
    if missing:
        raise ValueError(f"{path}: routing config {routing} needs tensors missing from the checkpoint: {missing[:5]}")
    model.load_state_dict(state, strict=False)
    check_budget_record(model, where)
    return model.eval()
