"""GPT-OSS: vLLM's ``GptOssForCausalLM`` with :class:`ZedaSparseMoeBlock` as every layer's ``mlp`` (biased router
logits, top-k on the logits, softmax over the k picked). The experts keep what vLLM's GPT-OSS experts have: biases,
the clamped SwiGLU (``swigluoai``) and vLLM's GPT-OSS expert loader. vLLM's model takes the MLP class as a class
attribute of its block and the block class as one of its body, so only those are swapped; attention (sinks,
alternating sliding window) stays vLLM's. The checkpoint's ``mlp.router`` loads into the block's ``gate``, the
router's ``zero_logit_bias`` (a buffer, which vLLM's GPT-OSS loader skips) is copied here."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models import gpt_oss as vgo
from vllm.model_executor.models.utils import maybe_prefix

from zeda_lightning.routing.scoring import LogitTopKSoftmaxScoring
from zeda_lightning.routing.zero_experts import BUDGET_BUFFER
from zeda_lightning.serving.families.base import (
    ZedaSparseMoeBlock,
    finish_causal_lm,
    init_causal_lm,
    register_family,
)


def zeda_gpt_oss_block(vllm_config: VllmConfig, layer_idx: int, prefix: str = "") -> ZedaSparseMoeBlock:
    """The zeda block of one GPT-OSS layer (the signature of vLLM's ``MLPBlock``)."""
    config = vllm_config.model_config.hf_config
    return ZedaSparseMoeBlock(
        vllm_config, prefix, num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
        intermediate_size=config.intermediate_size, scoring=LogitTopKSoftmaxScoring(), router_bias=True,
        experts_kwargs=dict(has_bias=True, activation="swigluoai", routed_experts_cls=vgo.GptOssRoutedExperts),
    )


class ZedaGptOssTransformerBlock(vgo.TransformerBlock):
    """vLLM's GPT-OSS block (forward unchanged) with the zeda block as its ``mlp``."""

    mlp_cls = staticmethod(zeda_gpt_oss_block)


class ZedaGptOssModel(vgo.GptOssModel):
    """vLLM's GPT-OSS body (forward and weight loading unchanged) built with :class:`ZedaGptOssTransformerBlock`."""

    block_cls = ZedaGptOssTransformerBlock

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        buffers = dict(self.named_buffers())
        loaded: set[str] = set()

        def renamed():
            for name, tensor in weights:
                name = name.replace(".mlp.router.", ".mlp.gate.")  # the checkpoint's router is the block's gate
                if name.endswith(f".gate.{BUDGET_BUFFER}"):
                    buffers[name].copy_(tensor)
                    loaded.add(name)
                    continue
                yield name, tensor

        return loaded | vgo.GptOssModel.load_weights(self, renamed())


@register_family("gpt_oss")
class ZedaGptOssForCausalLM(vgo.GptOssForCausalLM):
    """A zeda export of GPT-OSS in vLLM: vLLM's model, its MoE blocks replaced by :class:`ZedaSparseMoeBlock`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = init_causal_lm(self, vllm_config)
        self.vllm_config = vllm_config
        self.model = ZedaGptOssModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        finish_causal_lm(self, vllm_config, prefix, config.num_local_experts)
