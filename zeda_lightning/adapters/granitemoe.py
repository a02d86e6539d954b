"""GraniteMoE: bias-free router logits, top-k on the fp32 logits, softmax over the k picked logits, weights cast back
to the hidden states' dtype; the block (``block_sparse_moe``) calls it ``router``."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import GraniteMoeScoring


@register_adapter
class GraniteMoeAdapter(FamilyAdapter):
    model_type = "granitemoe"
    router_path = "transformers.models.granitemoe.modeling_granitemoe:GraniteMoeTopKRouter"
    scoring_cls = GraniteMoeScoring
    router_attr = "router"
