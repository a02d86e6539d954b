"""GPT-OSS: biased router logits, top-k on the logits, softmax over the k picked logits; the block calls it ``router``.
Zero experts get bias entries sampled like the new rows."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import LogitTopKSoftmaxScoring


@register_adapter
class GptOssAdapter(FamilyAdapter):
    model_type = "gpt_oss"
    router_path = "transformers.models.gpt_oss.modeling_gpt_oss:GptOssTopKRouter"
    scoring_cls = LogitTopKSoftmaxScoring
    router_attr = "router"
