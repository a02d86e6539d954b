"""LFM2-MoE (lfm2_moe): vLLM's ``Lfm2MoeForCausalLM`` (short-convolution and attention layers) with
:class:`ZedaSparseMoeBlock` as the ``feed_forward`` of every layer from ``num_dense_layers`` on (the first ones stay
vLLM's dense MLP). Scoring is LFM2's: sigmoid scores, top-k on ``scores + expert_bias``, the unbiased scores
renormalised (+1e-6) when ``norm_topk_prob``, times ``routed_scaling_factor``. The checkpoint's
``feed_forward.expert_bias`` (N + N_Z) maps to the router's ``gate.e_score_correction_bias`` through vLLM's own
weight-name mapping; experts are named w1/w2/w3. vLLM's layers and body take no block argument, so they are rebuilt
here (the same modules under the same names); the head is tied or not as the config says, as in transformers.
The attention's rotary embedding gets its queries flattened (:class:`FlatRotary`: a vLLM 0.32 CPU-kernel fault)."""

from __future__ import annotations

from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.mamba.short_conv import ShortConv
from vllm.model_executor.models import lfm2_moe as vl
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix

from zeda_lightning.routing.scoring import SigmoidTopKScoring
from zeda_lightning.serving.families.base import (
    ZedaSparseMoeBlock,
    build_model_body,
    finish_causal_lm,
    init_causal_lm,
    register_family,
)


class FlatRotary(nn.Module):
    """vLLM's rotary embedding handed (tokens, heads x head_dim) queries and keys. vLLM's LFM2 attention passes them
    as (tokens, heads, head_dim), and vLLM 0.32's CPU rotary kernel rotates such a query wrongly when it has more
    than one head (measured: max |diff| 5.1 against its own native rotation; 2-D input agrees to 2e-7), which puts
    plain vLLM's LFM2-MoE prompt log-probs up to 1.4 off transformers'."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary

    def forward(self, positions, query, key):
        q, k = self.rotary(positions, query.reshape(query.shape[0], -1), key.reshape(key.shape[0], -1))
        return q.view(query.shape), k.view(key.shape)


def zeda_lfm2_feed_forward(vllm_config: VllmConfig, layer_idx: int, prefix: str) -> nn.Module:
    """vLLM's dense MLP in the first ``num_dense_layers`` layers, the zeda block after."""
    config = vllm_config.model_config.hf_config
    if layer_idx < config.num_dense_layers:
        return vl.Lfm2MoeMlp(dim=config.hidden_size, ff_dim=config.intermediate_size,
                             quant_config=vllm_config.quant_config, prefix=prefix)
    return ZedaSparseMoeBlock(
        vllm_config, prefix, num_experts=config.num_experts, top_k=config.num_experts_per_tok,
        intermediate_size=config.moe_intermediate_size,
        scoring=SigmoidTopKScoring(config.routed_scaling_factor, config.norm_topk_prob),
        ckpt_names=("w1", "w2", "w3"), has_correction_bias=config.use_expert_bias,
    )


class ZedaLfm2MoeAttentionDecoderLayer(vl.Lfm2MoeAttentionDecoderLayer):
    """vLLM's LFM2-MoE attention layer with the zeda ``feed_forward`` (forward unchanged)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.prefix, self.config = prefix, config
        self.layer_idx = layer_idx = extract_layer_index(prefix)
        self.self_attn = vl.Lfm2MoeAttention(
            config=config, layer_idx=layer_idx, hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
            max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
            cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.self_attn",
        )
        self.self_attn.rotary_emb = FlatRotary(self.self_attn.rotary_emb)
        self.feed_forward = zeda_lfm2_feed_forward(vllm_config, layer_idx, f"{prefix}.feed_forward")
        self.operator_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)


class ZedaLfm2MoeShortConvDecoderLayer(vl.Lfm2MoeShortConvDecoderLayer):
    """vLLM's LFM2-MoE short-convolution layer with the zeda ``feed_forward`` (forward unchanged)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.layer_idx = layer_idx = extract_layer_index(prefix)
        self.short_conv = ShortConv(
            config=config, dim=config.hidden_size, layer_idx=layer_idx, model_config=vllm_config.model_config,
            cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.short_conv",
        )
        self.feed_forward = zeda_lfm2_feed_forward(vllm_config, layer_idx, f"{prefix}.feed_forward")
        self.operator_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)


def zeda_lfm2_layer(vllm_config: VllmConfig, prefix: str) -> nn.Module:
    """The layer ``config.layer_types`` names, as vLLM's body picks it."""
    config = vllm_config.model_config.hf_config
    attention = config.layer_types[extract_layer_index(prefix)] == "full_attention"
    cls = ZedaLfm2MoeAttentionDecoderLayer if attention else ZedaLfm2MoeShortConvDecoderLayer
    return cls(vllm_config, prefix)


@support_torch_compile
class ZedaLfm2MoeModel(vl.Lfm2MoeModel):
    """vLLM's LFM2-MoE body (forward and weight loading unchanged) built with the zeda layers."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        build_model_body(self, vllm_config, prefix, zeda_lfm2_layer, norm="embedding_norm", norm_eps=config.norm_eps)
        self.num_redundant_experts = 0


@register_family("lfm2_moe")
class ZedaLfm2MoeForCausalLM(vl.Lfm2MoeForCausalLM):
    """A zeda export of LFM2-MoE in vLLM: vLLM's model, its MoE blocks replaced by :class:`ZedaSparseMoeBlock`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = init_causal_lm(self, vllm_config)
        self.model = ZedaLfm2MoeModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        finish_causal_lm(self, vllm_config, prefix, config.num_experts)
