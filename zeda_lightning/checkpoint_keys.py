"""Checkpoint key -> model key, by transformers' own conversion mapping for the family.

Checkpoints do not always name tensors as the modules do: Mixtral's hub layout saves ``block_sparse_moe.gate`` for
the module ``mlp.gate`` and one ``experts.{e}.w1/w2/w3`` per expert where transformers 5 holds fused 3-D
``experts.gate_up_proj`` / ``experts.down_proj``; the Qwen, OLMoE, GLM and DeepSeek families save per-expert
``gate_proj/up_proj/down_proj`` (and ``save_pretrained`` writes that layout back). transformers describes each
family's renamings and merges (``conversion_mapping.get_model_conversion_mapping``); :class:`CheckpointKeys` applies
that description to one checkpoint's key list, so the whole-model loader (``export.from_pretrained``) and the
shard-by-shard one (``sharding.SafetensorsReader``) read what transformers' ``from_pretrained`` would, the latter
only the experts of its own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

try:  # transformers >= 5
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )
except ImportError:  # an older layout: checkpoint keys are the module names
    get_model_conversion_mapping = None

#: ``read(checkpoint key, start, stop)``: rows ``[start, stop)`` (dim 0) of a checkpoint tensor, all of it when
#: ``start`` is None
ReadRows = Callable[[str, "int | None", "int | None"], Tensor]


class CheckpointKeys:
    """Which checkpoint tensors make each tensor of ``model``, for one checkpoint's ``saved_keys``."""

    def __init__(self, model: nn.Module, saved_keys: Iterable[str]) -> None:
        #: model key -> the checkpoint key holding it as it is (renamed or not)
        self.renamed: dict[str, str] = {}
        #: model key -> (transformers' converter, {source pattern: checkpoint keys in expert order})
        self.merged: dict[str, tuple[Any, dict[str, list[str]]]] = {}
        if get_model_conversion_mapping is None:
            self.renamed = {k: k for k in saved_keys}
            return
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern: dict[str, Any] = {}
        for converter in converters:
            for pattern in converter.source_patterns:
                by_pattern.setdefault(pattern, converter)
        known = dict.fromkeys(model.state_dict(), True)
        prefix = getattr(model, "base_model_prefix", None) or None
        # transformers' own loop (convert_and_load_state_dict_in_model): natural key order, so experts stack 0..E-1
        for saved in sorted(saved_keys, key=dot_natural_key):
            key, pattern = rename_source_key(saved, renamings, converters, prefix, known)
            if key not in known and saved in known:  # a name the model has is not renamed away
                key, pattern = rename_source_key(saved, [], [], prefix, known)
            if pattern is None:
                self.renamed.setdefault(key, saved)
            else:
                converter, parts = self.merged.setdefault(key, (by_pattern[pattern], {}))
                parts.setdefault(pattern, []).append(saved)

    def __contains__(self, key: str) -> bool:
        return key in self.renamed or key in self.merged

    def sources(self, key: str) -> list[str]:
        """The checkpoint keys model tensor ``key`` is made from."""
        if key in self.renamed:
            return [self.renamed[key]]
        return [k for keys in self.merged[key][1].values() for k in keys] if key in self.merged else []

    def read(self, key: str, read: ReadRows, start: int | None = None, stop: int | None = None) -> Tensor:
        """Model tensor ``key`` (rows ``[start, stop)`` of dim 0 when ``start`` is given) from checkpoint tensors
        fetched with ``read``. A merge that stacks per-expert tensors along dim 0 reads only the experts of those
        rows; any other conversion reads everything and slices."""
        if key in self.renamed:
            return read(self.renamed[key], start, stop)
        if key not in self.merged:
            raise KeyError(key)
        converter, parts = self.merged[key]
        by_rows = start is not None and stop is not None and stop > start and _stacks_rows(converter)
        tensors: dict[str, Any] = {
            pattern: [read(k, None, None) for k in (keys[start:stop] if by_rows else keys)]
            for pattern, keys in parts.items()
        }
        for op in converter.operations:  # as WeightConverter.convert runs them
            tensors = op.convert(tensors, source_patterns=converter.source_patterns,
                                 target_patterns=converter.target_patterns, full_layer_name=key, model=None,
                                 config=None, missing_keys=None)
        (out,) = tensors.values()
        return out if by_rows or start is None else out[start:stop]


def _stacks_rows(converter) -> bool:
    """Is dim 0 of the result the list of source tensors (one per expert), e.g. MergeModulelist(dim=0), then
    Concatenate(dim=1) of gate and up?"""
    ops = list(converter.operations)
    return (bool(ops) and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
            and all(isinstance(op, Concatenate) and op.dim != 0 for op in ops[1:]))
