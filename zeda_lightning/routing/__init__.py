"""Routing variants, one per file, behind one base class and a name registry.

YAML picks a variant by ``class_path`` (e.g. ``zeda_lightning.routing.ZeroExperts``); notebooks and tests can use
``get_routing("zero_experts", ...)``.
"""

from zeda_lightning.routing.base import (
    BUDGET,
    CAPABILITIES,
    MASKABLE,
    ROUTING_VARIANTS,
    ZERO_SLOTS,
    BaseRouter,
    MoEDims,
    RouterOutput,
    RoutingVariant,
    capture_routing,
    check_init_args,
    get_routing,
    iter_routers,
    register_routing,
    replay_routing,
    routing_from_config,
    supports,
)
from zeda_lightning.routing.null_experts import NullExpertRouter, NullExperts
from zeda_lightning.routing.adamoe import AdaMoE
from zeda_lightning.routing.adaptive_k import AdaptiveK, AdaptiveKRouter
from zeda_lightning.routing.beam import Beam, BeamRouter, BeamRouterOutput
from zeda_lightning.routing.longcat_bias import LongCatBias, LongCatBiasRouter
from zeda_lightning.routing.moe_plus_plus import MoEPlusPlus, MoEPlusPlusRouter
from zeda_lightning.routing.static_topk import StaticTopK, StaticTopKRouter
from zeda_lightning.routing.top_p import TopP, TopPRouter
from zeda_lightning.routing.zero_experts import ZeroExpertRouter, ZeroExperts

__all__ = [
    "BUDGET",
    "CAPABILITIES",
    "MASKABLE",
    "ROUTING_VARIANTS",
    "ZERO_SLOTS",
    "AdaMoE",
    "AdaptiveK",
    "AdaptiveKRouter",
    "BaseRouter",
    "Beam",
    "BeamRouter",
    "BeamRouterOutput",
    "LongCatBias",
    "LongCatBiasRouter",
    "MoEDims",
    "MoEPlusPlus",
    "MoEPlusPlusRouter",
    "NullExpertRouter",
    "NullExperts",
    "RouterOutput",
    "RoutingVariant",
    "StaticTopK",
    "StaticTopKRouter",
    "TopP",
    "TopPRouter",
    "ZeroExpertRouter",
    "ZeroExperts",
    "capture_routing",
    "check_init_args",
    "get_routing",
    "iter_routers",
    "register_routing",
    "replay_routing",
    "routing_from_config",
    "supports",
]
