"""HunYuan-MoE-V1 (hunyuan_v1_moe): softmax top-k always renormalised, weights cast back to the logits' dtype,
logits in fp32 while the router weight is fp32. The weight lives in a nested ``nn.Linear`` (``gate.wg``); the
injected router keeps its grown weight there."""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter
from zeda_lightning.routing.scoring import HunYuanScoring


@register_adapter
class HunYuanMoEV1Adapter(FamilyAdapter):
    model_type = "hunyuan_v1_moe"
    router_path = "transformers.models.hunyuan_v1_moe.modeling_hunyuan_v1_moe:HunYuanMoEV1Gate"
    scoring_cls = HunYuanScoring
    tensor_homes = {"weight": "gate.wg.weight"}
