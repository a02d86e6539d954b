"""GPT-OSS: biased router logits, top-k on the logits, softmax over the k picked logits; the block calls it ``router``.
Zero experts get bias entries sampled like the new rows."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.adapters.scoring import LogitTopKSoftmaxScoring


@register_adapter
class GptOssAdapter(FamilyAdapter):
    model_type = "gpt_oss"
    router_attr = "router"

    def router_class(self):
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

        return GptOssTopKRouter

    def scoring(self, router):
        return LogitTopKSoftmaxScoring()
