"""PhiMoE (phimoe): not supported; injecting raises a ValueError.

Its router is SparseMixer (``sparsemixer`` in ``modeling_phimoe``): always exactly two experts, picked one after
the other with a jitter-threshold mask relative to the best remaining logit, each weight a softmax over its own
masked logits. In training it samples both picks with Gumbel noise and backpropagates through ``PhimoeMultiplier``
(Heun's third-order estimator), and it jitters the router input. A ``RouterScoring`` is a deterministic
select + combine with no training mode, so the rule could not be kept exactly while the injected router trains.
"""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter


@register_adapter
class PhimoeAdapter(FamilyAdapter):
    model_type = "phimoe"
    router_path = "transformers.models.phimoe.modeling_phimoe:PhimoeTopKRouter"
    unsupported = (
        "phimoe is not supported: its SparseMixer router always picks two experts sequentially and, in training, "
        "samples them with Gumbel noise and a custom Heun-estimator backward (PhimoeMultiplier); a deterministic "
        "RouterScoring cannot keep that rule exactly while the injected router trains"
    )
