"""OLMoE: vLLM's ``OlmoeForCausalLM`` with :class:`ZedaSparseMoeBlock` in every layer (softmax top-k,
``norm_topk_prob`` False in the released model); vLLM's model takes the decoder layer as an argument."""

from __future__ import annotations

from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models import olmoe as vo

from zeda_lightning.routing.scoring import SoftmaxTopKScoring
from zeda_lightning.serving.families.base import (
    ZedaSparseMoeBlock,
    check_vllm_config,
    record_moe_layers,
    register_family,
)


class ZedaOlmoeDecoderLayer(vo.OlmoeDecoderLayer):
    """vLLM's OLMoE decoder layer with :class:`ZedaSparseMoeBlock` as its ``mlp`` (forward unchanged)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.hidden_size = config.hidden_size
        self.self_attn = vo.OlmoeAttention(vllm_config=vllm_config, prefix=f"{prefix}.self_attn")
        self.mlp = ZedaSparseMoeBlock(
            vllm_config, f"{prefix}.mlp", num_experts=config.num_experts, top_k=config.num_experts_per_tok,
            intermediate_size=config.intermediate_size,
            scoring=SoftmaxTopKScoring(norm_topk_prob=config.norm_topk_prob),
        )
        # vLLM's OLMoE norms use eps 1e-5 whatever the config says (check_servable_config refuses another)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=1e-5)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=1e-5)


@register_family("olmoe")
class ZedaOlmoeForCausalLM(vo.OlmoeForCausalLM):
    """A zeda export of OLMoE in vLLM: vLLM's model with :class:`ZedaOlmoeDecoderLayer`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = check_vllm_config(vllm_config)  # before any weight is allocated
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=ZedaOlmoeDecoderLayer)
        record_moe_layers(self, config.num_experts)
