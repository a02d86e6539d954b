"""GLM-4.5 / 4.6 (glm4_moe): vLLM's ``Glm4MoeForCausalLM`` with :class:`ZedaSparseMoeBlock` in every MoE layer
(layers from ``first_k_dense_replace`` on; the first ones stay vLLM's dense MLP). Scoring is DeepSeek-V3's sigmoid
rule: selection on ``scores + e_score_correction_bias`` (the router's N + N_Z fp32 buffer, loaded from the weights
under vLLM's name ``mlp.gate.e_score_correction_bias``) limited to the best ``topk_group`` of ``n_group`` groups,
weights renormalised when ``norm_topk_prob`` and times ``routed_scaling_factor``; vLLM's shared experts
(``mlp.shared_experts``, unscaled) are added on every token, as transformers' ``Glm4MoeMoE`` adds them. vLLM's
model body takes no decoder-layer argument, so it is rebuilt here with the zeda layer (the same modules under the
same names, shared-expert fusion off: vLLM's weight loading and checkpoint-name mapping apply as is)."""

from __future__ import annotations

from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models import glm4_moe as vg
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix

from zeda_lightning.routing.scoring import SigmoidGroupScoring
from zeda_lightning.serving.families.base import (
    ZedaSparseMoeBlock,
    build_model_body,
    finish_causal_lm,
    init_causal_lm,
    register_family,
)


def zeda_glm4_moe_block(vllm_config: VllmConfig, prefix: str) -> ZedaSparseMoeBlock:
    """The zeda block of one GLM-4.5 MoE layer; ``shared_experts`` as vLLM (and the checkpoint) names them."""
    config = vllm_config.model_config.hf_config
    shared = None
    if config.n_shared_experts:
        shared = vg.Glm4MoeMLP(hidden_size=config.hidden_size,
                               intermediate_size=config.moe_intermediate_size * config.n_shared_experts,
                               hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
                               reduce_results=False, prefix=f"{prefix}.shared_experts")
    scoring = SigmoidGroupScoring(n_group=config.n_group, topk_group=config.topk_group,
                                  routed_scaling_factor=config.routed_scaling_factor,
                                  norm_topk_prob=config.norm_topk_prob)
    return ZedaSparseMoeBlock(
        vllm_config, prefix, num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok,
        intermediate_size=config.moe_intermediate_size, scoring=scoring, shared_expert=shared,
        shared_expert_name="shared_experts", has_correction_bias=True,
    )


class ZedaGlm4MoeDecoderLayer(vg.Glm4MoeDecoderLayer):
    """vLLM's GLM-4.5 decoder layer with the zeda block in every MoE layer (forward unchanged)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.hidden_size = config.hidden_size
        self.layer_idx = layer_idx = extract_layer_index(prefix)
        self.self_attn = vg.Glm4MoeAttention(
            config=config, hidden_size=self.hidden_size, num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            max_position_embeddings=getattr(config, "max_position_embeddings", 131072), head_dim=config.head_dim,
            rms_norm_eps=config.rms_norm_eps, qkv_bias=config.attention_bias, cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config, prefix=f"{prefix}.self_attn", use_qk_norm=config.use_qk_norm,
        )
        if config.n_routed_experts is not None and layer_idx >= config.first_k_dense_replace:
            self.mlp = zeda_glm4_moe_block(vllm_config, f"{prefix}.mlp")
        else:
            self.mlp = vg.Glm4MoeMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                     hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
                                     prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.routed_scaling_factor = config.routed_scaling_factor


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class ZedaGlm4MoeModel(vg.Glm4MoeModel):
    """vLLM's GLM-4.5 body (forward and weight loading unchanged) built with :class:`ZedaGlm4MoeDecoderLayer`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        build_model_body(self, vllm_config, prefix, ZedaGlm4MoeDecoderLayer)
        # the shared experts stay their own module (added after the kept-pairs sum), never fused into the experts
        self.is_fused_shared_expert_enabled = False


@register_family("glm4_moe")
class ZedaGlm4MoeForCausalLM(vg.Glm4MoeForCausalLM):
    """A zeda export of GLM-4.5 in vLLM: vLLM's model, its MoE layers replaced by the zeda block."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = init_causal_lm(self, vllm_config)
        self.model = ZedaGlm4MoeModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        finish_causal_lm(self, vllm_config, prefix, config.n_routed_experts)
        self.moe_mlp_layers = []  # vLLM's EPLB hook list: the plugin runs without EPLB

