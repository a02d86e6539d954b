"""Mixtral: vLLM's ``MixtralForCausalLM`` with :class:`ZedaSparseMoeBlock` as every layer's ``block_sparse_moe``
(softmax top-k always renormalised over the k slots, weights kept in fp32; experts named w1/w2/w3). vLLM's model
body takes no decoder-layer argument, so it is rebuilt here with the zeda layer (the same modules under the same
names: vLLM's weight loading, its checkpoint-name mapping included, applies as is)."""

from __future__ import annotations

from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models import mixtral as vm
from vllm.model_executor.models.utils import maybe_prefix

from zeda_lightning.routing.scoring import MixtralScoring
from zeda_lightning.serving.families.base import (
    ZedaSparseMoeBlock,
    build_model_body,
    finish_causal_lm,
    init_causal_lm,
    register_family,
)


class ZedaMixtralDecoderLayer(vm.MixtralDecoderLayer):
    """vLLM's Mixtral decoder layer with :class:`ZedaSparseMoeBlock` as ``block_sparse_moe`` (forward unchanged)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.hidden_size = config.hidden_size
        self.self_attn = vm.MixtralAttention(
            config=config, hidden_size=self.hidden_size, num_heads=config.num_attention_heads,
            max_position=config.max_position_embeddings, num_kv_heads=config.num_key_value_heads,
            cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.self_attn",
        )
        self.block_sparse_moe = ZedaSparseMoeBlock(
            vllm_config, f"{prefix}.block_sparse_moe", num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok, intermediate_size=config.intermediate_size,
            scoring=MixtralScoring(norm_topk_prob=True, cast_weights=False), ckpt_names=("w1", "w2", "w3"),
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


@support_torch_compile
class ZedaMixtralModel(vm.MixtralModel):
    """vLLM's Mixtral body (forward and weight loading unchanged) built with :class:`ZedaMixtralDecoderLayer`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        config = build_model_body(self, vllm_config, prefix, ZedaMixtralDecoderLayer)
        self.org_vocab_size = config.vocab_size
        self.enable_eplb, self.num_redundant_experts = False, 0  # what vLLM's weight loading reads


@register_family("mixtral")
class ZedaMixtralForCausalLM(vm.MixtralForCausalLM):
    """A zeda export of Mixtral in vLLM: vLLM's model, its MoE blocks replaced by :class:`ZedaSparseMoeBlock`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = init_causal_lm(self, vllm_config)
        self.model = ZedaMixtralModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        finish_causal_lm(self, vllm_config, prefix, config.num_local_experts)
