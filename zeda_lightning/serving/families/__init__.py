"""The vLLM model classes of the zeda plugin, one file per family, behind :data:`FAMILY_CLASSES`.

Each ``<model_type>.py`` defines ``Zeda<Arch>`` (vLLM's own model for the family with its MoE blocks replaced by
:class:`~zeda_lightning.serving.families.base.ZedaSparseMoeBlock`) and registers it with ``@register_family``. The
subpackage imports vLLM: only :mod:`zeda_lightning.serving.plugin` imports it. Adding a family: its file here, its
import below, its entry in :data:`zeda_lightning.serving.SERVED_FAMILIES`.
"""

from zeda_lightning.serving.families import (  # noqa: F401  (registers)
    ernie4_5_moe,
    glm4_moe,
    gpt_oss,
    granitemoe,
    lfm2_moe,
    mixtral,
    olmoe,
    qwen2_moe,
    qwen3_moe,
)
from zeda_lightning.serving.families.base import FAMILY_CLASSES, ZedaSparseMoeBlock, kept_pair_routing

__all__ = ["FAMILY_CLASSES", "ZedaSparseMoeBlock", "kept_pair_routing"]
