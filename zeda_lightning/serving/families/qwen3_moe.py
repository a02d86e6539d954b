"""Qwen3-MoE: vLLM's ``Qwen3MoeForCausalLM`` with :class:`ZedaSparseMoeBlock` in every MoE layer (softmax top-k,
renormalised when ``norm_topk_prob``); vLLM's model takes the decoder layer as an argument."""

from __future__ import annotations

from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models import qwen3_moe as vq
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix

from zeda_lightning.routing.scoring import SoftmaxTopKScoring
from zeda_lightning.serving.families.base import (
    ZedaSparseMoeBlock,
    finish_causal_lm,
    init_causal_lm,
    register_family,
)


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
            self.mlp = ZedaSparseMoeBlock(
                vllm_config, f"{prefix}.mlp", num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                intermediate_size=config.moe_intermediate_size,
                scoring=SoftmaxTopKScoring(norm_topk_prob=config.norm_topk_prob),
                is_fused_checkpoint_transposed=is_fused_checkpoint_transposed,
            )
        else:
            self.mlp = vq.Qwen3MoeMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                      hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
                                      prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


@register_family("qwen3_moe")
class ZedaQwen3MoeForCausalLM(vq.Qwen3MoeForCausalLM):
    """A zeda export of Qwen3-MoE in vLLM: vLLM's model, its MoE layers replaced by :class:`ZedaSparseMoeBlock`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = init_causal_lm(self, vllm_config)
        self.packed_modules_mapping = dict(self.packed_modules_mapping)
        if getattr(config, "mlp_only_layers", []):
            self.packed_modules_mapping["gate_up_proj"] = ["gate_proj", "up_proj"]
        self.model = vq.Qwen3MoeModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                      decoder_layer_type=ZedaQwen3MoeDecoderLayer)
        finish_causal_lm(self, vllm_config, prefix, config.num_experts)
