"""HunYuan-MoE-V1 (hunyuan_v1_moe): not supported; injecting raises a ValueError.

Its router (``HunYuanMoEV1Gate``) keeps its weight in a nested ``nn.Linear`` (``gate.wg.weight``) instead of a
``weight`` of its own. ``inject`` builds the new router from the original's own ``weight`` / ``bias`` /
``e_score_correction_bias`` and keeps those names key for key, so the original rows could be neither copied nor
mapped to the checkpoint's ``gate.wg.weight``. (Its scoring, softmax top-k always renormalised and cast back to the
logits' dtype, would be ``SoftmaxTopKScoring``.)
"""

from zeda_lightning.adapters.base import FamilyAdapter, register_adapter


@register_adapter
class HunYuanMoEV1Adapter(FamilyAdapter):
    model_type = "hunyuan_v1_moe"
    router_path = "transformers.models.hunyuan_v1_moe.modeling_hunyuan_v1_moe:HunYuanMoEV1Gate"
    unsupported = (
        "hunyuan_v1_moe is not supported: its router HunYuanMoEV1Gate keeps its weight in a nested nn.Linear "
        "(gate.wg.weight), not in a 'weight' of its own, so inject can neither copy the original rows into the new "
        "router nor keep the checkpoint's parameter names"
    )
