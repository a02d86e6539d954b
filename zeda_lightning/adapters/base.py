"""Family adapters and the injection converter.

A family adapter is a small diff against :class:`FamilyAdapter`: the original router class, where the block keeps
it, the family's scoring rule, and where the family keeps a router tensor the router does not own itself
(``tensor_homes``, see :mod:`zeda_lightning.adapters.homes`). :func:`inject` swaps only the routers (original rows
copied), hooks the experts so skipped slots are never computed, records the routing choice in ``model.config`` and
checks that no MoE block was missed. The experts' weights and classes are untouched; no modeling file is forked.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, ClassVar

from torch import Tensor, nn

from zeda_lightning.routing.scoring import RouterScoring
from zeda_lightning.adapters.homes import OriginalRouter, find, house
from zeda_lightning.adapters.skipping import install_sentinel_skip
from zeda_lightning.routing.base import MASKABLE, BaseRouter, MoEDims, RoutingVariant, supports

#: key under which the routing choice is stored in ``model.config`` (and so in ``config.json``)
CONFIG_KEY = "zeda_routing"

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


class FamilyAdapter:
    """Protocol of one model family (keyed by ``config.model_type``). A family file sets the class attributes;
    override the methods only where a family needs more."""

    model_type: ClassVar[str]
    #: ``module:Class`` of the family's original router, imported lazily
    router_path: ClassVar[str]
    #: the family's scoring rule
    scoring_cls: ClassVar[type[RouterScoring]]
    #: attribute of the MoE block that holds the router
    router_attr: ClassVar[str] = "gate"
    #: router tensors (``weight``, ``bias``, ``e_score_correction_bias``) the family keeps somewhere other than on
    #: the router, by path relative to the MoE block; the injected router keeps its grown ones there too
    tensor_homes: ClassVar[dict[str, str]] = {}
    #: why the family cannot be injected (named in the ``ValueError`` every use raises), or ``None``
    unsupported: ClassVar[str | None] = None

    def router_class(self) -> type[nn.Module]:
        module, _, name = self.router_path.partition(":")
        return getattr(importlib.import_module(module), name)

    def original(self, block: nn.Module) -> OriginalRouter:
        """The block's original router with its tensors read from the family's homes (what ``build`` copies)."""
        return OriginalRouter(block, self.router_attr, self.tensor_homes)

    def original_state(self, block: nn.Module) -> dict[str, Tensor]:
        """Every tensor of the block's original router, by key relative to the block: its own state and the homes
        outside it (LFM2's ``expert_bias``). A loader fills them before injecting."""
        router = getattr(block, self.router_attr)
        state = {f"{self.router_attr}.{k}": t for k, t in router.state_dict(keep_vars=True).items()}
        for path in self.tensor_homes.values():
            t = find(block, path)
            if t is not None:
                state.setdefault(path, t)
        return state

    def scoring(self, router: nn.Module) -> RouterScoring:
        """The family's exact scoring rule, read off an original router instance."""
        return self.scoring_cls.from_router(router)

    def dims(self, router: nn.Module) -> MoEDims:
        """The hidden size is read off the weight (some routers, e.g. GraniteMoE's and HunYuan's, keep no
        ``hidden_dim``)."""
        return MoEDims(hidden_size=router.weight.shape[1], num_experts=router.num_experts, top_k=router.top_k)

    def find_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(qualified name, block)`` for every MoE block, original or already injected."""
        if self.unsupported is not None:
            raise ValueError(self.unsupported)
        cls = self.router_class()
        return [
            (name, mod)
            for name, mod in model.named_modules()
            if isinstance(getattr(mod, self.router_attr, None), (cls, BaseRouter)) and hasattr(mod, "experts")
        ]


ADAPTERS: dict[str, FamilyAdapter] = {}


def register_adapter(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator: register a family adapter under its ``model_type``."""
    ADAPTERS[cls.model_type] = cls()
    return cls


def adapter_for(model: nn.Module) -> FamilyAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unknown MoE family {model_type!r}: supported model types are {sorted(ADAPTERS)}. "
            "To add one, write zeda_lightning/adapters/<model_type>.py with a FamilyAdapter subclass (router class, "
            "router attribute, scoring rule) decorated with @register_adapter, and import it in "
            "zeda_lightning/adapters/__init__.py; adapters/mixtral.py is a complete example."
        )
    return ADAPTERS[model_type]


def _layer_index(name: str, fallback: int) -> int:
    m = _LAYER_RE.search(name + ".")
    return int(m.group(1)) if m else fallback


def _missed_blocks(model: nn.Module, found: set[str]) -> list[str]:
    """Modules that look like MoE experts containers but were not matched by the adapter."""
    return [
        name
        for name, mod in model.named_modules()
        if name not in found and hasattr(mod, "experts") and hasattr(getattr(mod, "experts"), "num_experts")
    ]


def inject(model: nn.Module, routing: RoutingVariant, *, init: bool = True) -> nn.Module:
    """Replace every MoE router of ``model`` with ``routing``'s router, in place; return ``model``.

    Every check runs before the first module is touched: unknown family, no MoE layer, a model that is already
    injected, and the variant's own bounds (``routing.validate``). ``init=False`` only allocates the new rows (use
    it before loading a checkpoint of an injected model).
    """
    if not isinstance(routing, RoutingVariant):
        raise ValueError(f"routing must be a RoutingVariant (e.g. ZeroExperts()), got {type(routing).__name__}")
    adapter = adapter_for(model)
    blocks = adapter.find_blocks(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} ({adapter.model_type}) has no MoE layer: nothing to inject. Check the config "
            "(e.g. mlp_only_layers / first_k_dense_replace / mlp_layer_types cover every layer)."
        )
    if any(isinstance(getattr(b, adapter.router_attr), BaseRouter) for _, b in blocks):
        raise ValueError(
            "model already has injected routers; rebuild it from the original checkpoint (or use "
            "zeda_lightning.from_pretrained for a saved injected model) instead of injecting twice"
        )
    missed = _missed_blocks(model, {n for n, _ in blocks})
    if missed:
        raise ValueError(f"{adapter.model_type} adapter did not recognise the MoE blocks {missed}; update its router_class")

    plans: list[tuple[nn.Module, BaseRouter, OriginalRouter]] = []
    first = adapter.original(blocks[0][1]).weight
    # one generator for the whole model: every layer's new rows get their own draw
    generator = routing.make_generator(first.device) if init and not first.is_meta else None
    for i, (name, block) in enumerate(blocks):
        original = adapter.original(block)
        dims = adapter.dims(original)
        routing.validate(dims)
        router = routing.build(original, dims, adapter.scoring(original), init=init, generator=generator)
        router.layer_idx = _layer_index(name, i)
        plans.append((block, router, original))
    # -- nothing above changed the model; from here on, swap -------------------------------------------------
    skip_hooks = []
    for block, router, original in plans:
        setattr(block, adapter.router_attr, router)
        house(block, router, original, adapter.tensor_homes)
        skip_hooks.append(install_sentinel_skip(block.experts))
    routing.connect([router for _, router, _ in plans], skip_hooks)
    setattr(model.config, CONFIG_KEY, routing.to_config())
    if getattr(model.config, "output_router_logits", False):
        # transformers records router logits only from its own router classes, and its balance loss would then
        # see none; routing is read through capture_routing instead (and balanced by zeda_lightning.losses)
        model.config.output_router_logits = False
    return model


def routing_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys owned by injected routers (grown or added relative to the original model), those they keep
    in their block included (LFM2's ``expert_bias``)."""
    names = {id(mod): name for name, mod in model.named_modules()}
    keys: dict[str, None] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, BaseRouter):
            keys.update(dict.fromkeys(f"{name}.{k}" for k in mod.state_dict()))
            keys.update(dict.fromkeys(f"{names[id(owner)]}.{attr}" for owner, attr, _ in mod.homes.values()))
    return list(keys)


def set_zero_mask(model: nn.Module, masked: bool) -> int:
    """Mask (or unmask) the zero experts of every injected router that is :data:`MASKABLE`; returns how many.

    Masked, the model computes exactly the original model (bit-identical logits): the teacher in ``shared_weights``
    mode is the student with this switch on.
    """
    count = 0
    for mod in model.modules():
        if supports(mod, MASKABLE):
            mod.mask_zero = masked
            count += 1
    return count


def describe(model: nn.Module) -> dict[str, Any]:
    """Small summary for logs: family, variant, layers, N, pool size, K."""
    routers = [m for m in model.modules() if isinstance(m, BaseRouter)]
    if not routers:
        return {"injected": False}
    r = routers[0]
    return {
        "injected": True,
        "family": model.config.model_type,
        "routing": getattr(model.config, CONFIG_KEY, None),
        "moe_layers": [m.layer_idx for m in routers],
        "num_experts": r.num_experts,
        "pool": r.weight.shape[0],
        "top_k": r.top_k,
    }
