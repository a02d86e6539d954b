"""Debug flavours of every supported family: a few layers, hidden 32, 8 experts, random weights.

Used by tests, benchmarks and notebooks; nothing here downloads anything.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

_COMMON: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, head_dim=8),
    "qwen2_moe": dict(
        moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=24,
        norm_topk_prob=False,
    ),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen3_next": dict(
        moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=24,
        norm_topk_prob=True, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"],
    ),
    "deepseek_v3": dict(
        moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2,
        topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, norm_topk_prob=True, num_key_value_heads=4,
    ),
    "glm4_moe": dict(
        moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
        topk_group=1, routed_scaling_factor=1.8, first_k_dense_replace=0, head_dim=8, norm_topk_prob=True,
    ),
    "glm4_moe_lite": dict(
        moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
        topk_group=1, routed_scaling_factor=1.8, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, num_hidden_layers=3, num_key_value_heads=4,
    ),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "dots1": dict(
        moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2,
        topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=0, head_dim=8, norm_topk_prob=True,
    ),
    "flex_olmo": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, pad_token_id=0, eos_token_id=1),
    "ernie4_5_moe": dict(moe_intermediate_size=16, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
                         moe_layer_start_index=0),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, head_dim=8),
    "lfm2_moe": dict(
        moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        num_hidden_layers=3, num_dense_layers=1, layer_types=["conv", "full_attention", "conv"],
    ),
}

FAMILIES: tuple[str, ...] = tuple(TINY_OVERRIDES)


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    if model_type not in TINY_OVERRIDES:
        raise ValueError(f"no tiny flavour for {model_type!r}; known: {list(TINY_OVERRIDES)}")
    kwargs = {**_COMMON, **TINY_OVERRIDES[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised causal LM of the family in fp32 eval mode, with non-trivial routing.

    Routers and correction biases get random values (HF inits some of them to zeros, which would make routing
    degenerate and parity tests vacuous).
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight", "gate.wg.weight")) and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith(("router.bias", "e_score_correction_bias")):  # ERNIE's bias is a frozen parameter
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model.eval()
