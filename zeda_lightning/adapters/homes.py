"""Where a family keeps its router's tensors, and how an injected router keeps its grown ones in the same place.

Most routers own their ``weight`` (and ``bias`` / ``e_score_correction_bias``). Some families keep one elsewhere:
HunYuan the weight in a nested ``nn.Linear`` (``gate.wg.weight``), ERNIE the correction bias in a nested statistics
module, shaped (1, N) (``gate.moe_statics.e_score_correction_bias``), LFM2 the correction bias in the MoE block,
which passes it to the router at each call (``expert_bias``). An adapter names such paths
(``FamilyAdapter.tensor_homes``); the new router is built from the tensors found there (:class:`OriginalRouter`),
and after the swap :func:`house` moves its grown tensors to the same paths, in the family's shape. State-dict keys,
transformers' checkpoint conversions and exports therefore stay the family's own.
"""

from __future__ import annotations

from torch import Tensor, nn

from zeda_lightning.routing.base import BaseRouter

#: the router tensors a routing variant reads, with the dims it sees them in (``weight`` (N, H), the others (N,))
ROUTER_TENSORS = {"weight": 2, "bias": 1, "e_score_correction_bias": 1}


def home_paths(router_attr: str, tensor_homes: dict[str, str]) -> dict[str, str]:
    """Each router tensor's path relative to the MoE block: the family's declared home, else on the router."""
    return {name: tensor_homes.get(name, f"{router_attr}.{name}") for name in ROUTER_TENSORS}


def find(block: nn.Module, path: str) -> Tensor | None:
    owner_path, _, attr = path.rpartition(".")
    try:
        owner = block.get_submodule(owner_path)
    except AttributeError:
        return None
    return getattr(owner, attr, None)


class OriginalRouter:
    """A family's original router as ``RoutingVariant.build`` reads it: ``weight``, ``bias`` and
    ``e_score_correction_bias`` from wherever the family keeps them, in the dims the router sees (extra leading
    dims of size 1 dropped); every other attribute (``top_k``, ``norm_topk_prob``...) is the router's own."""

    def __init__(self, block: nn.Module, router_attr: str, tensor_homes: dict[str, str]) -> None:
        self._router = getattr(block, router_attr)
        #: name -> the leading dims the family stores beyond the router's view (ERNIE's bias: (1,))
        self.lead: dict[str, tuple[int, ...]] = {}
        for name, path in home_paths(router_attr, tensor_homes).items():
            t, dims = find(block, path), ROUTER_TENSORS[name]
            if t is not None:
                self.lead[name] = tuple(t.shape[: t.dim() - dims])
                t = t if t.dim() == dims else t.view(t.shape[t.dim() - dims:])
            setattr(self, name, t)

    def __getattr__(self, name: str):
        return getattr(self._router, name)


def _module_at(block: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` under ``block``, holder modules created where the new router has none (HunYuan's
    ``wg``)."""
    owner = block
    for part in filter(None, path.split(".")):
        if part not in owner._modules:
            owner.add_module(part, nn.Module())
        owner = owner._modules[part]
    return owner


def house(block: nn.Module, router: BaseRouter, original: OriginalRouter, tensor_homes: dict[str, str]) -> None:
    """Move ``router``'s tensors (already in ``block``) to the family's declared homes, shaped as the family stores
    them; the router reads them there through ``router.homes``."""
    for name, path in tensor_homes.items():
        t = getattr(router, name)
        if t is None:
            continue
        delattr(router, name)
        owner_path, _, attr = path.rpartition(".")
        owner = _module_at(block, owner_path)
        lead = original.lead.get(name, ())
        stored = t.detach().view(*lead, *t.shape) if lead else t
        if isinstance(t, nn.Parameter):
            owner.register_parameter(attr, t if stored is t else nn.Parameter(stored, t.requires_grad))
        else:
            owner.register_buffer(attr, stored)
        router.homes[name] = (owner, attr, t.dim())
