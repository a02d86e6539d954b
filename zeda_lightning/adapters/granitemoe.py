"""GraniteMoE: bias-free router logits, top-k on the fp32 logits, softmax over the k picked logits, weights cast back
to the hidden states' dtype; the block (``block_sparse_moe``) calls it ``router``. The router keeps no ``hidden_dim``,
so the hidden size is read off its weight."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.base import MoEDims
from zeda_lightning.routing.scoring import GraniteMoeScoring


@register_adapter
class GraniteMoeAdapter(FamilyAdapter):
    model_type = "granitemoe"
    router_path = "transformers.models.granitemoe.modeling_granitemoe:GraniteMoeTopKRouter"
    scoring_cls = GraniteMoeScoring
    router_attr = "router"

    def dims(self, router):
        return MoEDims(hidden_size=router.weight.shape[1], num_experts=router.num_experts, top_k=router.top_k)
