"""The vLLM plugin: zeda exports served by vLLM with their zero slots skipped (no fork, no remote code).

``register`` (entry point ``vllm.general_plugins: zeda``) registers one model class per served family
(:data:`zeda_lightning.serving.SERVED_FAMILIES`) under the architecture name an export records
(``ZedaQwen3MoeForCausalLM``, ``ZedaQwen2MoeForCausalLM``, ``ZedaOlmoeForCausalLM``, ``ZedaMixtralForCausalLM``,
``ZedaGlm4MoeForCausalLM``, ``ZedaGraniteMoeForCausalLM``, ``ZedaGptOssForCausalLM``, ``ZedaErnie4_5_MoeForCausalLM``,
``ZedaLfm2MoeForCausalLM``); a family it does not serve gets :class:`ZedaRefusedForCausalLM`, which refuses with
the reason.
Each class, in :mod:`zeda_lightning.serving.families`, is vLLM's own model for the family with one change per MoE
layer, :class:`~zeda_lightning.serving.families.base.ZedaSparseMoeBlock`: the package's router with the family's
scoring, and only the kept (token, slot) pairs handed to vLLM's fused-MoE layer (a shared expert, where the family
has one, runs on every token as in transformers).

Each block counts its routed and zero slots (``zero_slot_counts``) so the zero-slot share is measured inside vLLM.
This module and the :mod:`~zeda_lightning.serving.families` subpackage it imports are the only ones of the package
that import vLLM.
"""

from __future__ import annotations

from torch import nn
from vllm import ModelRegistry

from zeda_lightning.export import serving_architecture
from zeda_lightning.serving import NOT_SERVED, served_architectures
from zeda_lightning.serving.families import FAMILY_CLASSES, ZedaSparseMoeBlock, kept_pair_routing
from zeda_lightning.serving.families.base import check_vllm_config
from zeda_lightning.serving.families.qwen3_moe import ZedaQwen3MoeDecoderLayer, ZedaQwen3MoeForCausalLM


def zero_slot_counts(model: nn.Module, reset: bool = False) -> dict:
    """``{"slots", "zero_slots", "layers": {idx: [slots, zero]}}`` counted by the blocks since the last reset (for
    ``LLM.apply_model``)."""
    layers = {m.gate.layer_idx: list(m.slot_counts) for m in model.modules() if isinstance(m, ZedaSparseMoeBlock)}
    if reset:
        for m in model.modules():
            if isinstance(m, ZedaSparseMoeBlock):
                m.slot_counts = [0, 0]
    return {"slots": sum(v[0] for v in layers.values()), "zero_slots": sum(v[1] for v in layers.values()),
            "layers": layers}


def reset_zero_slot_counts(model: nn.Module) -> dict:
    """:func:`zero_slot_counts`, then zero them."""
    return zero_slot_counts(model, reset=True)


class ZedaRefusedForCausalLM(nn.Module):
    """Registered under the architecture of every :data:`~zeda_lightning.serving.NOT_SERVED` family, so vLLM
    given such an export stops with the plugin's one-line reason (and ``--engine hf``) instead of an unknown
    architecture; it never builds a model."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__()
        check_vllm_config(vllm_config)  # raises: the family is not served
        raise AssertionError("unreachable: check_vllm_config refuses every NOT_SERVED family")

    # the text-generation interface vLLM inspects before building the model
    def embed_input_ids(self, input_ids):
        raise NotImplementedError

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        raise NotImplementedError

    def compute_logits(self, hidden_states):
        raise NotImplementedError


def register() -> None:
    """vLLM general plugin: register the zeda architecture of every served family, and the refusing class under
    that of every family it does not serve (idempotent)."""
    supported = ModelRegistry.get_supported_archs()
    for arch, family in served_architectures().items():
        if family not in FAMILY_CLASSES:
            raise RuntimeError(f"SERVED_FAMILIES lists {family!r} but zeda_lightning/serving/families has no model "
                               "class registered for it")
        if arch not in supported:
            ModelRegistry.register_model(arch, FAMILY_CLASSES[family])
    for hf_arch, _ in NOT_SERVED.values():
        if serving_architecture(hf_arch) not in supported:
            ModelRegistry.register_model(serving_architecture(hf_arch), ZedaRefusedForCausalLM)


__all__ = ["FAMILY_CLASSES", "ZedaQwen3MoeDecoderLayer", "ZedaQwen3MoeForCausalLM", "ZedaRefusedForCausalLM",
           "ZedaSparseMoeBlock",
           "kept_pair_routing", "register", "reset_zero_slot_counts", "zero_slot_counts"]
