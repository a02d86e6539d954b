"""Qwen2-MoE: vLLM's ``Qwen2MoeForCausalLM`` with :class:`ZedaSparseMoeBlock` in every MoE layer (softmax top-k,
``norm_topk_prob`` False in the released configs) and vLLM's sigmoid-gated shared expert added on every token, as
transformers' ``Qwen2MoeSparseMoeBlock`` adds it. vLLM's model body takes no decoder-layer argument, so it is
rebuilt here with the zeda layer (the same modules under the same names: vLLM's weight loading applies as is)."""

from __future__ import annotations

from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models import qwen2_moe as vq2
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix

from zeda_lightning.routing.scoring import SoftmaxTopKScoring
from zeda_lightning.serving.families.base import (
    ZedaSparseMoeBlock,
    build_model_body,
    finish_causal_lm,
    init_causal_lm,
    register_family,
)


def zeda_qwen2_moe_block(vllm_config: VllmConfig, prefix: str) -> ZedaSparseMoeBlock:
    """The zeda block of one Qwen2-MoE layer; ``shared_expert`` / ``shared_expert_gate`` as vLLM names them."""
    config = vllm_config.model_config.hf_config
    shared = gate = None
    if config.shared_expert_intermediate_size > 0:
        gate = ReplicatedLinear(config.hidden_size, 1, bias=False, quant_config=None,
                                prefix=f"{prefix}.shared_expert_gate")
        # vLLM's Qwen2MoeMLP applies sigmoid(shared_expert_gate(x)) * mlp(x) itself, as transformers does
        shared = vq2.Qwen2MoeMLP(hidden_size=config.hidden_size,
                                 intermediate_size=config.shared_expert_intermediate_size,
                                 hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
                                 expert_gate=gate, prefix=f"{prefix}.shared_expert")
    return ZedaSparseMoeBlock(
        vllm_config, prefix, num_experts=config.num_experts, top_k=config.num_experts_per_tok,
        intermediate_size=config.moe_intermediate_size,
        scoring=SoftmaxTopKScoring(norm_topk_prob=config.norm_topk_prob), shared_expert=shared,
        shared_expert_gate=gate,
    )


class ZedaQwen2MoeDecoderLayer(vq2.Qwen2MoeDecoderLayer):
    """vLLM's Qwen2-MoE decoder layer with the zeda block in every MoE layer (forward unchanged)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.hidden_size = config.hidden_size
        self.self_attn = vq2.Qwen2MoeAttention(
            hidden_size=self.hidden_size, num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads, rope_parameters=config.rope_parameters,
            max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
            cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.self_attn",
            dual_chunk_attention_config=getattr(config, "dual_chunk_attention_config", None),
        )
        layer_idx = extract_layer_index(prefix)
        if layer_idx not in (getattr(config, "mlp_only_layers", None) or []) and (
            config.num_experts > 0 and (layer_idx + 1) % config.decoder_sparse_step == 0
        ):
            self.mlp = zeda_qwen2_moe_block(vllm_config, f"{prefix}.mlp")
        else:
            self.mlp = vq2.Qwen2MoeMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                       hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
                                       prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


@support_torch_compile
class ZedaQwen2MoeModel(vq2.Qwen2MoeModel):
    """vLLM's Qwen2-MoE body (forward unchanged) built with :class:`ZedaQwen2MoeDecoderLayer`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        build_model_body(self, vllm_config, prefix, ZedaQwen2MoeDecoderLayer, quantized_embedding=True)


@register_family("qwen2_moe")
class ZedaQwen2MoeForCausalLM(vq2.Qwen2MoeForCausalLM):
    """A zeda export of Qwen2-MoE in vLLM: vLLM's model, its MoE layers replaced by the zeda block."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = init_causal_lm(self, vllm_config)
        self.packed_modules_mapping = dict(self.packed_modules_mapping)
        if getattr(config, "mlp_only_layers", []) or config.shared_expert_intermediate_size > 0:
            self.packed_modules_mapping["gate_up_proj"] = ["gate_proj", "up_proj"]
        self.model = ZedaQwen2MoeModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        finish_causal_lm(self, vllm_config, prefix, config.num_experts)
