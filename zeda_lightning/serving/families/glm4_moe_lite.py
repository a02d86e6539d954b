"""GLM-4.7-Flash (glm4_moe_lite): vLLM's ``Glm4MoeLiteForCausalLM`` (DeepSeek-V2 MLA attention) with
:class:`ZedaSparseMoeBlock` in every MoE layer (the ``sparse`` entries of ``mlp_layer_types``; the ``dense`` ones stay
vLLM's dense MLP). The MoE block is GLM-4.5's (see :mod:`~zeda_lightning.serving.families.glm4_moe`): sigmoid group scoring
on ``scores + e_score_correction_bias``, ``routed_scaling_factor``, unscaled shared experts on every token. vLLM's
model body takes no decoder-layer argument, so it is rebuilt here with the zeda layer (the same modules under the
same names, shared-expert fusion off: vLLM's weight loading and checkpoint-name mapping apply as is). On CPU vLLM's
MLA kernel needs ``kv_lora_rank + qk_rope_head_dim == 576`` (GLM-4.7-Flash's 512 + 64)."""

from __future__ import annotations

from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models import glm4_moe_lite as vl
from vllm.model_executor.models.utils import extract_layer_index, make_layers, maybe_prefix
from vllm.platforms import current_platform

from zeda_lightning.serving.families.base import check_vllm_config, finish_causal_lm, register_family
from zeda_lightning.serving.families.glm4_moe import zeda_glm4_moe_block


def is_moe_layer(config, layer_idx: int) -> bool:
    """transformers' rule: ``mlp_layer_types[i] == "sparse"`` (vLLM's model reads ``first_k_dense_replace``,
    which the transformers config does not have)."""
    types = getattr(config, "mlp_layer_types", None)
    if types is not None:
        return types[layer_idx] == "sparse"
    return layer_idx >= getattr(config, "first_k_dense_replace", 1)


class ZedaGlm4MoeLiteDecoderLayer(vl.Glm4MoeLiteDecoderLayer):
    """vLLM's GLM-4.7-Flash decoder layer with the zeda block in every MoE layer (forward unchanged)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.hidden_size = config.hidden_size
        self.layer_idx = layer_idx = extract_layer_index(prefix)
        attn_cls = vl.Glm4MoeLiteMLAAttention if vllm_config.model_config.use_mla else vl.Glm4MoeLiteAttention
        self.self_attn = attn_cls(
            vllm_config=vllm_config, config=config, hidden_size=self.hidden_size,
            num_heads=config.num_attention_heads, qk_nope_head_dim=config.qk_nope_head_dim,
            qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
            q_lora_rank=getattr(config, "q_lora_rank", None), kv_lora_rank=config.kv_lora_rank,
            max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
            cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.self_attn", topk_indices_buffer=None,
        )
        if is_moe_layer(config, layer_idx):
            self.mlp = zeda_glm4_moe_block(vllm_config, f"{prefix}.mlp")
        else:
            self.mlp = vl.Glm4MoeLiteMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                         hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
                                         prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.routed_scaling_factor = config.routed_scaling_factor


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class ZedaGlm4MoeLiteModel(vl.Glm4MoeLiteModel):
    """vLLM's GLM-4.7-Flash body (forward and weight loading unchanged) built with the zeda decoder layer."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.config, self.vocab_size = config, config.vocab_size
        self.device = current_platform.device_type
        self.is_v32 = False  # no sparse-attention indexer (refused by the config check)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, lambda prefix: ZedaGlm4MoeLiteDecoderLayer(vllm_config, prefix),
            prefix=f"{prefix}.layers")
        # the shared experts stay their own module (added after the kept-pairs sum), never fused into the experts
        self.is_fused_shared_expert_enabled = False
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


@register_family("glm4_moe_lite")
class ZedaGlm4MoeLiteForCausalLM(vl.Glm4MoeLiteForCausalLM):
    """A zeda export of GLM-4.7-Flash in vLLM: vLLM's model, its MoE layers replaced by the zeda block."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        config = check_vllm_config(vllm_config)  # before any weight is allocated
        self.config, self.quant_config = config, vllm_config.quant_config
        self.use_mha = False
        self.fuse_qkv_a_proj = getattr(config, "q_lora_rank", None) is not None
        # an instance copy: vLLM's class-level mapping is mutated in place by its own __init__
        self.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
        if self.fuse_qkv_a_proj:
            self.packed_modules_mapping["fused_qkv_a_proj"] = ["q_a_proj", "kv_a_proj_with_mqa"]
        self.model = ZedaGlm4MoeLiteModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        finish_causal_lm(self, vllm_config, prefix, config.n_routed_experts)
        self.moe_mlp_layers = []  # vLLM's EPLB hook list: the plugin runs without EPLB
