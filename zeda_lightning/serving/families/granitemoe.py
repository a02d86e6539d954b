"""GraniteMoE: vLLM's ``GraniteMoeForCausalLM`` with :class:`ZedaSparseMoeBlock` as every layer's
``block_sparse_moe`` (bias-free logits, top-k on the fp32 logits, softmax over the k picked, weights cast back).
Granite's multipliers stay vLLM's, as transformers applies them: ``embedding_multiplier`` on the embeddings,
``residual_multiplier`` on both residual branches, ``attention_multiplier`` as the attention scale and
``1 / logits_scaling`` on the logits. vLLM's model body takes no decoder-layer argument, so it is rebuilt here with
the zeda layer (the same modules under the same names); the checkpoint's ``router`` maps to the block's ``gate``
through vLLM's own weight-name mapping, extended to the router's ``zero_logit_bias``."""

from __future__ import annotations

from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models import granitemoe as vgr
from vllm.model_executor.models.utils import WeightsMapper, maybe_prefix

from zeda_lightning.routing.scoring import GraniteMoeScoring
from zeda_lightning.routing.zero_experts import BUDGET_BUFFER
from zeda_lightning.serving.families.base import (
    ZedaSparseMoeBlock,
    build_model_body,
    finish_causal_lm,
    init_causal_lm,
    register_family,
)


class ZedaGraniteMoeDecoderLayer(vgr.GraniteMoeDecoderLayer):
    """vLLM's GraniteMoE decoder layer with :class:`ZedaSparseMoeBlock` as ``block_sparse_moe`` (forward, with its
    residual multiplier, unchanged)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.hidden_size = config.hidden_size
        self.self_attn = vgr.GraniteMoeAttention(
            config=config, hidden_size=self.hidden_size, num_heads=config.num_attention_heads,
            max_position=config.max_position_embeddings, num_kv_heads=config.num_key_value_heads,
            cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.self_attn", attention_multiplier=config.attention_multiplier,
        )
        self.block_sparse_moe = ZedaSparseMoeBlock(
            vllm_config, f"{prefix}.block_sparse_moe", num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok, intermediate_size=config.intermediate_size,
            scoring=GraniteMoeScoring(),
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.residual_multiplier = config.residual_multiplier


@support_torch_compile
class ZedaGraniteMoeModel(vgr.GraniteMoeModel):
    """vLLM's GraniteMoE body (forward with its embedding multiplier, weight loading) built with
    :class:`ZedaGraniteMoeDecoderLayer`."""

    # vLLM's mapping plus the router's budget buffer (checkpoint ``router``, the block's ``gate``)
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_suffix={**vgr.GraniteMoeModel.hf_to_vllm_mapper.orig_to_new_suffix,
                            f".router.{BUDGET_BUFFER}": f".gate.{BUDGET_BUFFER}"},
        orig_to_new_stacked=dict(vgr.GraniteMoeModel.hf_to_vllm_mapper.orig_to_new_stacked),
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        # vLLM's GraniteMoE causal LM makes its own (hidden states only) intermediate tensors
        config = build_model_body(self, vllm_config, prefix, ZedaGraniteMoeDecoderLayer, intermediate_tensors=False)
        self.embedding_multiplier = config.embedding_multiplier


@register_family("granitemoe")
class ZedaGraniteMoeForCausalLM(vgr.GraniteMoeForCausalLM):
    """A zeda export of GraniteMoE in vLLM: vLLM's model, its MoE blocks replaced by :class:`ZedaSparseMoeBlock`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = init_causal_lm(self, vllm_config)
        self.model = ZedaGraniteMoeModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        # transformers divides the logits by logits_scaling, as vLLM's granite head does
        finish_causal_lm(self, vllm_config, prefix, config.num_local_experts, logits_scale=1 / config.logits_scaling)
