"""What every served family shares: the kept-pairs MoE block, the model-level checks, the family registry.

:class:`ZedaSparseMoeBlock` replaces a family's MoE block in vLLM's own model for it:

- the router is this package's :class:`~zeda_lightning.routing.zero_experts.ZeroExpertRouter` (N + N_Z rows, the
  family's scoring from :mod:`zeda_lightning.routing.scoring`, the ``zero_logit_bias`` budget buffer loaded from
  the weights), built from ``config.zeda_routing`` through the routing registry only;
- vLLM's generic zero-expert path (``ZeroExpertFusedMoE``) would send zero slots to expert 0 with weight 0, so the
  block drops them itself: only the kept (token, slot) pairs enter vLLM's fused-MoE layer, as S' rows of top-1
  routing, and their outputs are summed back per token, as :mod:`zeda_lightning.adapters.skipping` does for
  transformers. The experts kernel (``cpu_fused_moe`` on CPU) computes S' rows, not T x K;
- a family's shared expert (vLLM's own module, given by the family file) runs on every token and is added after
  the routed sum, as transformers adds it.

Each block counts its routed and zero slots (``slot_counts``) so the zero-slot share is measured inside vLLM.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from vllm.config import CompilationMode, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.utils import (
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)

from zeda_lightning.routing.base import MoEDims
from zeda_lightning.routing.scoring import RouterScoring
from zeda_lightning.routing.zero_experts import ZeroExpertRouter
from zeda_lightning.serving import check_servable_config

#: model_type -> the vLLM model class serving a zeda export of it (filled by :func:`register_family`)
FAMILY_CLASSES: dict[str, type[nn.Module]] = {}


def register_family(model_type: str):
    """Class decorator: the vLLM model class of ``model_type``'s zeda exports."""
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        FAMILY_CLASSES[model_type] = cls
        return cls
    return wrap


def check_vllm_config(vllm_config: VllmConfig):
    """The model's hf config, after refusing (one line each) what the plugin cannot serve exactly; call it before
    any weight is allocated."""
    config = vllm_config.model_config.hf_text_config
    check_servable_config(config.to_dict(), "vLLM model config")
    if vllm_config.compilation_config.mode != CompilationMode.NONE:
        raise ValueError("the zeda plugin's MoE blocks have data-dependent shapes (only kept slots reach the "
                         "experts), which torch.compile is not set up for: run vLLM with enforce_eager=True "
                         "(--enforce-eager)")
    if get_tensor_model_parallel_world_size() != 1 or vllm_config.parallel_config.enable_eplb:
        raise ValueError("the zeda vLLM plugin runs with tensor_parallel_size 1 and no EPLB; drop those settings")
    return config


def kept_pair_routing(hidden_states: Tensor, gating_output: Tensor, topk: int, renormalize: bool):
    """vLLM ``custom_routing_function`` of the kept pairs: row s of ``gating_output`` is -inf except its expert's
    column, which holds the pair's combine weight, so top-1 returns ``(weight (S', 1), expert id (S', 1))``."""
    weights, ids = gating_output.float().max(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


class ZedaSparseMoeBlock(nn.Module):
    """A family's MoE block with the zeda router; zero slots never reach the experts.

    Args:
        vllm_config: the engine's config (``hf_text_config.zeda_routing`` gives the routing).
        prefix: the block's module path (``model.layers.3.mlp``); the router and experts load under it.
        num_experts, top_k, intermediate_size: the family's N, K and expert width, from the model config.
        scoring: the family's scoring rule (as its adapter in :mod:`zeda_lightning.adapters` uses).
        ckpt_names: the experts' checkpoint names (gate, down, up) when not vLLM's default.
        shared_expert: vLLM's shared-expert module of the family (its gate applied inside), or ``None``.
        shared_expert_gate: that gate, registered as the block's ``shared_expert_gate`` as well (the checkpoint's
            name), before ``shared_expert`` so the deduplicated module tree keeps that name.
        shared_expert_name: the shared expert's attribute (checkpoint) name, ``shared_experts`` for GLM-4.5.
        has_correction_bias: the router carries ``e_score_correction_bias`` (N + N_Z, fp32), loaded from the weights.
        router_bias: the router's logits have a bias (N + N_Z), loaded from the weights (GPT-OSS).
        router_dtype: the router's weights in this dtype whatever the model's (ERNIE keeps them in fp32).
        experts_kwargs: further arguments of vLLM's fused-MoE layer the family's experts need (GPT-OSS: expert
            biases, its clamped SwiGLU, its expert weight loader).
    """

    def __init__(self, vllm_config: VllmConfig, prefix: str, *, num_experts: int, top_k: int,
                 intermediate_size: int, scoring: RouterScoring, ckpt_names: tuple[str, str, str] | None = None,
                 is_fused_checkpoint_transposed: bool = False, shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Module | None = None, shared_expert_name: str = "shared_expert",
                 has_correction_bias: bool = False, router_bias: bool = False, router_dtype: torch.dtype | None = None,
                 experts_kwargs: dict | None = None) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_text_config
        routing = check_servable_config(config.to_dict(), "vLLM model config")
        # the attributes vLLM's own MoE blocks carry (tensor / expert parallel 1, no EPLB)
        self.tp_size, self.ep_size, self.enable_eplb, self.is_sequence_parallel = 1, 1, False, False
        self.n_routed_experts = self.n_logical_experts = self.n_physical_experts = num_experts
        self.n_local_physical_experts, self.n_redundant_experts = num_experts, 0
        dims = MoEDims(hidden_size=config.hidden_size, num_experts=num_experts, top_k=top_k)
        # the package's router, parameter for parameter: weight (N + N_Z, H) and the zero_logit_bias buffer
        self.gate = ZeroExpertRouter(dims, scoring, routing.resolve_num_zero(dims), routing.mask_zero,
                                     has_bias=router_bias, has_correction_bias=has_correction_bias)
        if router_dtype is not None:
            self.gate.to(router_dtype)
        self.gate.layer_idx = extract_layer_index(prefix)
        if shared_expert_gate is not None:
            self.shared_expert_gate = shared_expert_gate
        self._shared_name = shared_expert_name
        setattr(self, shared_expert_name, shared_expert)
        self.experts = FusedMoEFactory(
            num_experts=num_experts, top_k=1, hidden_size=config.hidden_size, intermediate_size=intermediate_size,
            renormalize=False, custom_routing_function=kept_pair_routing, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.experts", is_fused_checkpoint_transposed=is_fused_checkpoint_transposed,
            **({"ckpt_names": ckpt_names} if ckpt_names else {}), **(experts_kwargs or {}),
        )
        #: [routed slots, zero slots] since the last reset (read with ``plugin.zero_slot_counts``)
        self.slot_counts = [0, 0]

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        h = hidden_states.view(-1, shape[-1])
        out = self.gate.route(h)  # the package's routing: ids (T, K) with sentinel N on zero slots, weights (T, K)
        n, k = self.gate.num_experts, self.gate.top_k
        keep = out.selected_experts < n  # (T, K)
        flat = keep.reshape(-1).nonzero().squeeze(1)  # (S',) kept pair ids
        self.slot_counts[0] += keep.numel()
        self.slot_counts[1] += keep.numel() - flat.numel()
        result = h.new_zeros(h.shape)
        if flat.numel():
            ids = out.selected_experts.reshape(-1)[flat]  # (S',)
            weights = out.routing_weights.reshape(-1)[flat].float()  # (S',)
            encoded = torch.full((flat.numel(), n), float("-inf"), dtype=torch.float32, device=h.device)
            encoded.scatter_(1, ids.unsqueeze(1), weights.unsqueeze(1))  # (S', N)
            tok = flat // k
            y = self.experts(hidden_states=h[tok].contiguous(), router_logits=encoded)  # (S', H), weighted
            # NOTE: per token in slot order, as transformers' sentinel hook sums them on CPU
            result.index_add_(0, tok, y.to(result.dtype))
        shared = getattr(self, self._shared_name)
        if shared is not None:  # transformers: routed sum + (gated) shared expert, on every token
            result = result + shared(h)
        return result.view(shape)


def build_model_body(body: nn.Module, vllm_config: VllmConfig, prefix: str, decoder_layer, *,
                     quantized_embedding: bool = False, intermediate_tensors: bool = True, norm: str = "norm",
                     norm_eps: float | None = None, norm_cls: type[nn.Module] = RMSNorm):
    """Fill ``body``, a subclass of a family's vLLM ``<Family>Model`` whose ``__init__`` called only
    ``nn.Module.__init__``, as vLLM's own body is built, with ``decoder_layer(vllm_config, prefix)`` as every layer:
    ``config`` / ``quant_config`` / ``vocab_size``, ``embed_tokens``, ``layers`` (``make_layers``), ``norm`` and
    ``make_empty_intermediate_tensors``, the same modules under the same names, so vLLM's forward and weight
    loading apply as is. Returns the hf config; the family sets what else its vLLM body has.

    Args:
        quantized_embedding: the embedding takes the model's ``quant_config`` (as vLLM's body of the family does).
        intermediate_tensors: set ``make_empty_intermediate_tensors`` (hidden states and residual); off where vLLM's
            causal LM defines its own (GraniteMoE).
        norm, norm_eps, norm_cls: the final norm's attribute name, epsilon (default ``config.rms_norm_eps``) and
            class (vLLM's ``RMSNorm`` unless the family's own).
    """
    config = vllm_config.model_config.hf_config
    body.config, body.quant_config, body.vocab_size = config, vllm_config.quant_config, config.vocab_size
    body.embed_tokens = VocabParallelEmbedding(
        config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config if quantized_embedding else None,
        prefix=f"{prefix}.embed_tokens")
    body.start_layer, body.end_layer, body.layers = make_layers(
        config.num_hidden_layers, lambda prefix: decoder_layer(vllm_config, prefix), prefix=f"{prefix}.layers")
    setattr(body, norm, norm_cls(config.hidden_size, eps=config.rms_norm_eps if norm_eps is None else norm_eps))
    if intermediate_tensors:
        body.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)
    return config


def init_causal_lm(model: nn.Module, vllm_config: VllmConfig):
    """The start of a Zeda*ForCausalLM ``__init__`` (vLLM's own ``__init__`` not called): ``nn.Module.__init__``,
    the model-level checks (:func:`check_vllm_config`, before any weight is allocated), ``config`` and
    ``quant_config``; returns the hf config."""
    nn.Module.__init__(model)
    config = check_vllm_config(vllm_config)
    model.config, model.quant_config = config, vllm_config.quant_config
    return config


def finish_causal_lm(model: nn.Module, vllm_config: VllmConfig, prefix: str, num_experts: int,
                     logits_scale: float = 1.0) -> None:
    """The head and MoE bookkeeping of a Zeda*ForCausalLM once ``model.model`` is built: vLLM's LM head (tied
    when the config says so), logits processor (logits times ``logits_scale``), the body's
    ``make_empty_intermediate_tensors`` where it has one, and the ``MixtureOfExperts`` counts (no shared, no
    redundant)."""
    config = model.config
    model.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                   prefix=maybe_prefix(prefix, "lm_head"))
    if config.tie_word_embeddings:
        model.lm_head = model.lm_head.tie_weights(model.model.embed_tokens)
    model.logits_processor = LogitsProcessor(config.vocab_size, scale=logits_scale)
    if "make_empty_intermediate_tensors" in vars(model.model):
        model.make_empty_intermediate_tensors = model.model.make_empty_intermediate_tensors
    record_moe_layers(model, num_experts)


def record_moe_layers(model: nn.Module, num_experts: int) -> None:
    """Set the ``MixtureOfExperts`` counts vLLM reads off a model; refuses an export with no MoE layer."""
    blocks = [m for m in model.modules() if isinstance(m, ZedaSparseMoeBlock)]
    if not blocks:
        raise ValueError("the zeda export has no MoE layer (mlp_only_layers covers every layer); serve it with "
                         "vLLM's own architecture")
    model.moe_layers = [b.experts for b in blocks]
    model.num_moe_layers = len(blocks)
    model.num_expert_groups, model.num_shared_experts, model.num_redundant_experts = 1, 0, 0
    model.num_logical_experts = model.num_physical_experts = model.num_local_physical_experts = \
        model.num_routed_experts = num_experts
