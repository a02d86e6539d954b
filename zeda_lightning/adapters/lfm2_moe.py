"""LFM2-MoE (lfm2_moe): not supported; injecting raises a ValueError.

Its MoE block owns the selection bias (the ``expert_bias`` buffer of ``Lfm2MoeSparseMoeBlock``, N entries) and calls
the router as ``self.gate(hidden_states, expert_bias)``. An injected router takes the hidden states only and owns
its ``e_score_correction_bias``, so the call would fail, and the bias (outside the router) could not be grown over
the zero-expert slots.
"""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter


@register_adapter
class Lfm2MoeAdapter(FamilyAdapter):
    model_type = "lfm2_moe"
    router_path = "transformers.models.lfm2_moe.modeling_lfm2_moe:Lfm2MoeTopKRouter"
    unsupported = (
        "lfm2_moe is not supported: its MoE block keeps the selection bias (expert_bias, a buffer of the block, not "
        "of the router) and passes it to the router as a second forward argument, which an injected router neither "
        "accepts nor can grow over the zero-expert slots"
    )
