"""ERNIE-4.5-MoE (ernie4_5_moe): vLLM's ``Ernie4_5_MoeForCausalLM`` with :class:`ZedaSparseMoeBlock` in every MoE
layer (``moe_layer_start_index`` .. ``moe_layer_end_index`` every ``moe_layer_interval``; the others stay vLLM's
dense MLP). Scoring is ERNIE's: fp32 logits from an fp32 router, softmax, top-k on ``softmax +
e_score_correction_bias``, the unbiased probabilities renormalised (sum clamped at ``moe_norm_min``). The bias is
stored as ``mlp.moe_statics.e_score_correction_bias`` (1, N + N_Z); vLLM's ERNIE loader moves it to
``mlp.gate.e_score_correction_bias`` (N + N_Z), the router's buffer. vLLM's shared experts (``mlp.shared_experts``)
are added on every token, as transformers' ``Ernie4_5_MoeSparseMoeBlock`` adds them. vLLM's decoder layer and body
take no layer argument, so both are rebuilt here (the same modules under the same names)."""

from __future__ import annotations

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models import ernie45_moe as ve
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix
from vllm.transformers_utils.config import set_default_rope_theta

from zeda_lightning.routing.scoring import SoftmaxBiasScoring
from zeda_lightning.serving.families.base import (
    ZedaSparseMoeBlock,
    build_model_body,
    finish_causal_lm,
    init_causal_lm,
    register_family,
)


def is_moe_layer(config, layer_idx: int) -> bool:
    """ERNIE's rule (transformers' and vLLM's) for the layers with experts."""
    return (getattr(config, "moe_num_experts", 0) > 0 and (layer_idx + 1) % config.moe_layer_interval == 0
            and config.moe_layer_start_index <= layer_idx <= config.moe_layer_end_index)


def zeda_ernie_block(vllm_config: VllmConfig, prefix: str) -> ZedaSparseMoeBlock:
    """The zeda block of one ERNIE MoE layer; ``shared_experts`` as vLLM (and the checkpoint) names them."""
    config = vllm_config.model_config.hf_config
    shared = None
    if config.moe_num_shared_experts:
        shared = ve.Ernie4_5_MoeMLP(hidden_size=config.hidden_size,
                                    intermediate_size=config.moe_intermediate_size * config.moe_num_shared_experts,
                                    hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
                                    reduce_results=False, prefix=f"{prefix}.shared_experts")
    return ZedaSparseMoeBlock(
        vllm_config, prefix, num_experts=config.moe_num_experts, top_k=config.moe_k,
        intermediate_size=config.moe_intermediate_size, scoring=SoftmaxBiasScoring(config.moe_norm_min),
        shared_expert=shared, shared_expert_name="shared_experts", has_correction_bias=True,
        router_dtype=torch.float32,  # transformers keeps gate.weight in fp32 (_keep_in_fp32_modules_strict)
    )


class ZedaErnie4_5_MoeDecoderLayer(ve.Ernie4_5_MoeDecoderLayer):
    """vLLM's ERNIE-4.5-MoE decoder layer with the zeda block in every MoE layer (forward unchanged)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.hidden_size = config.hidden_size
        set_default_rope_theta(config, default_theta=500000)
        self.self_attn = ve.Ernie4_5_MoeAttention(
            hidden_size=self.hidden_size, num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads, head_dim=getattr(config, "head_dim", None),
            rope_parameters=config.rope_parameters,
            max_position_embeddings=getattr(config, "max_position_embeddings", 131072),
            rms_norm_eps=config.rms_norm_eps, qkv_bias=getattr(config, "use_bias", False),
            cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.self_attn",
        )
        self.layer_idx = layer_idx = extract_layer_index(prefix)
        if is_moe_layer(config, layer_idx):
            self.mlp = zeda_ernie_block(vllm_config, f"{prefix}.mlp")
        else:
            self.mlp = ve.Ernie4_5_MoeMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                          hidden_act=config.hidden_act, use_bias=getattr(config, "use_bias", False),
                                          quant_config=vllm_config.quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


@support_torch_compile
class ZedaErnie4_5_MoeModel(ve.Ernie4_5_MoeModel):
    """vLLM's ERNIE-4.5-MoE body (forward and weight loading unchanged) built with the zeda decoder layer."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        build_model_body(self, vllm_config, prefix, ZedaErnie4_5_MoeDecoderLayer, quantized_embedding=True)
        self.num_redundant_experts = 0


@register_family("ernie4_5_moe")
class ZedaErnie4_5_MoeForCausalLM(ve.Ernie4_5_MoeForCausalLM):
    """A zeda export of ERNIE-4.5-MoE in vLLM: vLLM's model, its MoE layers replaced by the zeda block."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = init_causal_lm(self, vllm_config)
        self.model = ZedaErnie4_5_MoeModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        finish_causal_lm(self, vllm_config, prefix, config.moe_num_experts)
