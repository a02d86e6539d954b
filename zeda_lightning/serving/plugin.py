"""The vLLM plugin: zeda exports served by vLLM with their zero slots skipped (no fork, no remote code).

``register`` (entry point ``vllm.general_plugins: zeda``) registers one model class per served family under the
architecture name an export records (``ZedaQwen3MoeForCausalLM``). The class is vLLM's own model for the family
with one change per MoE layer, :class:`ZedaSparseMoeBlock`:

- the router is this package's :class:`~zeda_lightning.routing.zero_experts.ZeroExpertRouter` (N + N_Z rows, the
  family's scoring from :mod:`zeda_lightning.routing.scoring`, the ``zero_logit_bias`` budget buffer loaded from
  the weights), built from ``config.zeda_routing`` through the routing registry only;
- vLLM's generic zero-expert path (``ZeroExpertFusedMoE``) would send zero slots to expert 0 with weight 0, so the
  block drops them itself: only the kept (token, slot) pairs enter vLLM's fused-MoE layer, as S' rows of top-1
  routing, and their outputs are summed back per token, as :mod:`zeda_lightning.adapters.skipping` does for
  transformers. The experts kernel (``cpu_fused_moe`` on CPU) computes S' rows, not T x K.

Each block counts its routed and zero slots (``zero_slot_counts``) so the zero-slot share is measured inside vLLM.
This module is the only one of the package that imports vLLM.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from vllm import ModelRegistry
from vllm.config import CompilationMode, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models import qwen3_moe as vq
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix

from zeda_lightning.routing.base import MoEDims
from zeda_lightning.routing.scoring import SoftmaxTopKScoring
from zeda_lightning.routing.zero_experts import ZeroExpertRouter
from zeda_lightning.serving import check_servable_config, served_architectures


def kept_pair_routing(hidden_states: Tensor, gating_output: Tensor, topk: int, renormalize: bool):
    """vLLM ``custom_routing_function`` of the kept pairs: row s of ``gating_output`` is -inf except its expert's
    column, which holds the pair's combine weight, so top-1 returns ``(weight (S', 1), expert id (S', 1))``."""
    weights, ids = gating_output.float().max(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


class ZedaSparseMoeBlock(vq.Qwen3MoeSparseMoeBlock):
    """Qwen3-MoE's sparse block with the zeda router; zero slots never reach the experts."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", is_fused_checkpoint_transposed: bool = False):
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_text_config
        routing = check_servable_config(config.to_dict(), "vLLM model config")
        if get_tensor_model_parallel_world_size() != 1 or vllm_config.parallel_config.enable_eplb:
            raise ValueError("the zeda vLLM plugin runs with tensor_parallel_size 1 and no EPLB; drop those settings")
        self.tp_size, self.ep_size, self.enable_eplb, self.is_sequence_parallel = 1, 1, False, False
        self.n_routed_experts = config.num_experts
        self.n_logical_experts = self.n_physical_experts = self.n_local_physical_experts = config.num_experts
        self.n_redundant_experts = 0
        self.shared_expert = self.shared_expert_gate = None
        dims = MoEDims(hidden_size=config.hidden_size, num_experts=config.num_experts,
                       top_k=config.num_experts_per_tok)
        scoring = SoftmaxTopKScoring(norm_topk_prob=config.norm_topk_prob)
        # the package's router, parameter for parameter: weight (N + N_Z, H) and the zero_logit_bias buffer
        self.gate = ZeroExpertRouter(dims, scoring, routing.resolve_num_zero(dims), routing.mask_zero,
                                     has_bias=False, has_correction_bias=False)
        self.gate.layer_idx = extract_layer_index(prefix)
        self.experts = FusedMoEFactory(
            num_experts=config.num_experts, top_k=1, hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size, renormalize=False,
            custom_routing_function=kept_pair_routing, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.experts", is_fused_checkpoint_transposed=is_fused_checkpoint_transposed,
        )
        #: [routed slots, zero slots] since the last reset (read with ``zero_slot_counts``)
        self.slot_counts = [0, 0]

    def forward(self, hidden_states: Tensor) -> Tensor:
        num_tokens, hidden = hidden_states.shape
        h = hidden_states.view(-1, hidden)
        out = self.gate.route(h)  # the package's routing: ids (T, K) with sentinel N on zero slots, weights (T, K)
        n, k = self.gate.num_experts, self.gate.top_k
        keep = out.selected_experts < n  # (T, K)
        flat = keep.reshape(-1).nonzero().squeeze(1)  # (S',) kept pair ids
        self.slot_counts[0] += keep.numel()
        self.slot_counts[1] += keep.numel() - flat.numel()
        result = h.new_zeros(num_tokens, hidden)
        if flat.numel() == 0:
            return result
        ids = out.selected_experts.reshape(-1)[flat]  # (S',)
        weights = out.routing_weights.reshape(-1)[flat].float()  # (S',)
        encoded = torch.full((flat.numel(), n), float("-inf"), dtype=torch.float32, device=h.device)
        encoded.scatter_(1, ids.unsqueeze(1), weights.unsqueeze(1))  # (S', N)
        tok = flat // k
        y = self.experts(hidden_states=h[tok].contiguous(), router_logits=encoded)  # (S', H), weighted
        # NOTE: per token in slot order, as transformers' sentinel hook sums them on CPU
        return result.index_add_(0, tok, y.to(result.dtype))


class ZedaQwen3MoeDecoderLayer(vq.Qwen3MoeDecoderLayer):
    """vLLM's Qwen3-MoE decoder layer with :class:`ZedaSparseMoeBlock` in every MoE layer (forward unchanged)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", is_fused_checkpoint_transposed: bool = False,
                 mrope_positions_factor: int = 4) -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_text_config
        self.hidden_size = config.hidden_size
        self.self_attn = vq.Qwen3MoeAttention(
            hidden_size=self.hidden_size, num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads, rope_parameters=config.rope_parameters,
            max_position_embeddings=getattr(config, "max_position_embeddings", 8192), rms_norm_eps=config.rms_norm_eps,
            qkv_bias=getattr(config, "attention_bias", False), head_dim=getattr(config, "head_dim", None),
            cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.self_attn",
            dual_chunk_attention_config=getattr(config, "dual_chunk_attention_config", None),
            mrope_positions_factor=mrope_positions_factor,
        )
        layer_idx = extract_layer_index(prefix)
        if layer_idx not in (getattr(config, "mlp_only_layers", None) or []) and (
            config.num_experts > 0 and (layer_idx + 1) % config.decoder_sparse_step == 0
        ):
            self.mlp = ZedaSparseMoeBlock(vllm_config, f"{prefix}.mlp", is_fused_checkpoint_transposed)
        else:
            self.mlp = vq.Qwen3MoeMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                      hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
                                      prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class ZedaQwen3MoeForCausalLM(vq.Qwen3MoeForCausalLM):
    """A zeda export of Qwen3-MoE in vLLM: vLLM's model, its MoE layers replaced by :class:`ZedaSparseMoeBlock`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_text_config
        check_servable_config(config.to_dict(), "vLLM model config")  # before any weight is allocated
        if vllm_config.compilation_config.mode != CompilationMode.NONE:
            raise ValueError("the zeda plugin's MoE blocks have data-dependent shapes (only kept slots reach the "
                             "experts), which torch.compile is not set up for: run vLLM with enforce_eager=True "
                             "(--enforce-eager)")
        self.config, self.quant_config = config, vllm_config.quant_config
        self.packed_modules_mapping = dict(self.packed_modules_mapping)
        if getattr(config, "mlp_only_layers", []):
            self.packed_modules_mapping["gate_up_proj"] = ["gate_proj", "up_proj"]
        self.model = vq.Qwen3MoeModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                      decoder_layer_type=ZedaQwen3MoeDecoderLayer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        blocks = [layer.mlp for layer in self.model.layers
                  if isinstance(getattr(layer, "mlp", None), ZedaSparseMoeBlock)]
        if not blocks:
            raise ValueError("the zeda export has no MoE layer (mlp_only_layers covers every layer); serve it with "
                             "vLLM's own architecture")
        self.moe_layers = [b.experts for b in blocks]
        self.num_moe_layers = len(blocks)
        self.num_expert_groups, self.num_shared_experts, self.num_redundant_experts = 1, 0, 0
        self.num_logical_experts = self.num_physical_experts = self.num_local_physical_experts = \
            self.num_routed_experts = config.num_experts


_CLASSES = {"qwen3_moe": ZedaQwen3MoeForCausalLM}


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


def register() -> None:
    """vLLM general plugin: register the zeda architecture of every served family (idempotent)."""
    for arch, family in served_architectures().items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, _CLASSES[family])
