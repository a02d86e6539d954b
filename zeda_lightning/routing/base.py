"""Routing variants: the YAML-facing spec, the router module it builds, and the output contract.

Shape glossary (used in comments across the package):
    B batch, S sequence, T = B * S tokens, H hidden size,
    N real experts, N_Z zero experts (or M null slots), P = N + N_Z pool size, K slots per token (top-k).

Contract: a router returns HF's triple ``(router_logits (T, P), routing_weights (T, K), selected_experts (T, K))``.
A skipped slot carries the sentinel index ``N`` and weight 0, so the experts module never computes it (see
``zeda_lightning.adapters.skipping``). The full record, with what losses and metrics need, is a :class:`RouterOutput`
collected by :func:`capture_routing`.
"""

from __future__ import annotations

import collections.abc
import contextlib
import functools
import inspect
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from zeda_lightning.routing.scoring import RouterScoring


#: What a routing variant (and the router it builds) supports, declared by each class instead of being inferred
#: from its base class: the trainer, the masked teacher and the budget knob ask for a capability, so a new variant
#: gets them by declaring it, not by subclassing ``ZeroExperts``.
MASKABLE = "maskable"  # ``mask_zero`` switches the router back to the exact original routing (bit-identical)
ZERO_SLOTS = "zero_slots"  # the pool holds zero-compute experts after the N real ones (L_GA sets their share)
BUDGET = "budget"  # honours the zero-logit bias, the inference compute knob of ``zeda_lightning.budget``
CAPABILITIES = frozenset({MASKABLE, ZERO_SLOTS, BUDGET})


def supports(obj: Any, capability: str) -> bool:
    """Does a routing variant or router (instance or class) declare ``capability``?"""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown routing capability {capability!r}; known: {sorted(CAPABILITIES)}")
    return capability in getattr(obj, "capabilities", frozenset())


@dataclass(frozen=True)
class MoEDims:
    """Dimensions read from the model at injection time, never from YAML."""

    hidden_size: int
    num_experts: int  # N
    top_k: int  # K


@dataclass
class RouterOutput:
    """One MoE layer's routing for one forward."""

    router_logits: Tensor  # (T, P) logits over the whole pool (masked columns are -inf)
    routing_weights: Tensor  # (T, K) combine weights, 0 on skipped slots
    selected_experts: Tensor  # (T, K) expert ids, sentinel N on skipped slots
    pool_indices: Tensor  # (T, K) ids in the pool before the sentinel mapping (for Switch balance)
    num_experts: int  # N
    score_func: str  # "softmax" | "sigmoid": how losses read router_logits

    @property
    def top_k(self) -> int:
        return self.selected_experts.shape[-1]

    @property
    def skipped(self) -> Tensor:
        return self.selected_experts >= self.num_experts  # (T, K) bool


class BaseRouter(nn.Module):
    """A drop-in for a family's router. Parameter names follow the original (``weight``, ``bias``,
    ``e_score_correction_bias``) so checkpoints map key for key; only shapes grow. A family that keeps one of them
    elsewhere (a nested module, or the MoE block) gets it moved there after the swap (``adapters.homes``): the
    router then reads it through :attr:`homes`, under the same attribute name."""

    #: see :data:`MASKABLE`, :data:`ZERO_SLOTS`, :data:`BUDGET`
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, dims: MoEDims, scoring: RouterScoring, num_rows: int, *, has_bias: bool, has_correction_bias: bool):
        super().__init__()
        self.dims = dims
        self.scoring = scoring
        self.top_k = dims.top_k
        self.num_experts = dims.num_experts
        self.hidden_dim = dims.hidden_size
        self.weight = nn.Parameter(torch.empty(num_rows, dims.hidden_size))  # (P, H)
        self.bias = nn.Parameter(torch.empty(num_rows)) if has_bias else None  # (P,) GPT-OSS
        if has_correction_bias:
            self.e_score_correction_bias = nn.Buffer(torch.zeros(num_rows, dtype=torch.float32))  # (P,)
        else:
            self.e_score_correction_bias = None
        self.layer_idx: int = -1
        self._sink: Callable[[int, RouterOutput], None] | None = None
        #: (T, K) pool ids to use instead of selecting (routing replay); -1 rows select as usual
        self._replay: Tensor | None = None
        #: tensor name -> (module keeping it, its attribute there, dims the router sees): set by ``adapters.homes``
        self.homes: dict[str, tuple[nn.Module, str, int]] = {}

    def __getattr__(self, name: str):
        home = self.__dict__.get("homes", {}).get(name)
        if home is None:
            return super().__getattr__(name)
        owner, attr, dims = home
        t = getattr(owner, attr)  # read at each use: .to(), to_empty() and FSDP replace the tensor in its owner
        return t if t.dim() == dims else t.view(t.shape[t.dim() - dims:])  # ERNIE's (1, P) bias -> (P,)

    def forward(self, hidden_states: Tensor, *block_args: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``block_args``: what a block passes beside the hidden states, a tensor this router reads from its home
        anyway (LFM2's block passes its ``expert_bias``, the router's correction bias); not used."""
        h = hidden_states.reshape(-1, self.hidden_dim)  # (T, H)
        out = self.route(h)
        if self._sink is not None:
            self._sink(self.layer_idx, out)
        return out.router_logits, out.routing_weights, out.selected_experts

    @abstractmethod
    def route(self, h: Tensor) -> RouterOutput: ...

    # -- helpers shared by the variants ----------------------------------------------------------------------
    def _select(self, logits: Tensor, num_real: int, k: int, correction_bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """The family's selection, or the replayed ids with the scores the current logits give them."""
        idx, top_scores = self.scoring.select(logits, num_real, k, correction_bias)  # (T, k)
        if self._replay is None:
            return idx, top_scores
        replay = self._replay.to(idx.device)
        if replay.shape != idx.shape:
            raise ValueError(f"routing replay for layer {self.layer_idx} has shape {tuple(replay.shape)}, "
                             f"the forward routes {tuple(idx.shape)}")
        # NOTE: gradient flows through the scores of the replayed ids (the routing that produced the sample)
        idx = torch.where(replay >= 0, replay, idx)
        return idx, self.scoring.gather_scores(logits, idx)

    def _real_logits(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        n = self.num_experts
        bias = self.bias[:n] if self.bias is not None else None
        ecb = self.e_score_correction_bias[:n] if self.e_score_correction_bias is not None else None
        return self.weight[:n], bias, ecb

    def _original_route(self, h: Tensor, k: int | None = None, rows=None) -> tuple[Tensor, Tensor, Tensor]:
        """The family's own routing over the N real experts: ``(logits (T, N), weights (T, k), ids (T, k))``.

        ``rows``: ``(weight, bias, correction_bias)`` to use instead of the live real-expert rows.
        """
        weight, bias, ecb = rows or self._real_logits()
        logits = self.scoring.logits(h, weight, bias)  # (T, N)
        idx, top_scores = self.scoring.select(logits, self.num_experts, k or self.top_k, ecb)
        return logits, self.scoring.combine(top_scores, self.scoring.weights_dtype(h, logits)), idx

    def _output(self, logits: Tensor, weights: Tensor, pool_idx: Tensor, skip: Tensor | None) -> RouterOutput:
        if skip is None:
            selected, weights = pool_idx, weights
        else:
            # NOTE: sentinel id N and weight 0: the experts never see the slot; no renorm after the drop.
            selected = pool_idx.masked_fill(skip, self.num_experts)
            weights = weights.masked_fill(skip, 0.0)
        return RouterOutput(logits, weights, selected, pool_idx, self.num_experts, self.scoring.score_func)

    def _pad_logits(self, logits: Tensor, pool: int) -> Tensor:
        if logits.shape[-1] == pool:
            return logits
        pad = logits.new_full((logits.shape[0], pool - logits.shape[-1]), float("-inf"))
        return torch.cat([logits, pad], dim=-1)  # (T, P)

    def extra_repr(self) -> str:
        return f"N={self.num_experts}, K={self.top_k}, pool={self.weight.shape[0]}, H={self.hidden_dim}"


def gaussian_rows_like(rows: Tensor, n_new: int, generator: torch.Generator | None = None) -> Tensor:
    """New rows drawn elementwise as ``mean_d + std_d * randn`` over the existing rows (ZEDA router init).

    Works for a weight (N, H) and for a bias vector (N,) alike.
    """
    ref = rows.detach().float()
    mean, std = ref.mean(dim=0), ref.std(dim=0) if ref.shape[0] > 1 else torch.zeros_like(ref[0])
    noise = torch.randn((n_new, *ref.shape[1:]), generator=generator, device=ref.device)
    return (mean + std * noise).to(rows.dtype)


def copy_original_rows(router: BaseRouter, original: nn.Module, generator: torch.Generator | None = None) -> None:
    """Copy the original router's N rows exactly into ``weight``, ``bias`` and ``e_score_correction_bias``;
    rows beyond N (zero experts) are sampled with :func:`gaussian_rows_like` from the original entries."""
    n = router.num_experts
    with torch.no_grad():
        for name in ("weight", "bias", "e_score_correction_bias"):
            new, old = getattr(router, name), getattr(original, name, None)
            if new is None:
                continue
            new[:n].copy_(old)
            if new.shape[0] > n:
                new[n:].copy_(gaussian_rows_like(old, new.shape[0] - n, generator))


class RoutingVariant(ABC):
    """YAML-facing spec of a routing variant: hyperparameters only; dimensions come from the model."""

    #: registry name, for notebooks and tests; YAML picks the class by ``class_path``.
    name: ClassVar[str]
    #: what the variant supports (:data:`MASKABLE`, :data:`ZERO_SLOTS`, :data:`BUDGET`); checked before building
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every variant's ``__init__`` checks its arguments' types first (``num_zero_experts=2.5`` is refused
        wherever it comes from: Python, a YAML dict, a saved ``config.json``)."""
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__dict__["__init__"]

        @functools.wraps(init)
        def checked_init(self, *args: Any, **kw: Any) -> None:
            bound = inspect.signature(init).bind(self, *args, **kw)
            check_init_args(cls, {k: v for k, v in bound.arguments.items() if k != "self"}, cls.__name__)
            init(self, *args, **kw)

        cls.__init__ = checked_init

    def validate(self, dims: MoEDims) -> None:
        """Raise ``ValueError`` naming the problem and the fix; called for every block before any is changed."""

    @abstractmethod
    def make_router(self, dims: MoEDims, scoring: RouterScoring, **kw: Any) -> BaseRouter:
        """Allocate the router module (``kw``: ``has_bias``, ``has_correction_bias`` from the original)."""

    def init_router(self, router: BaseRouter, original: nn.Module, generator: torch.Generator | None) -> None:
        """Fill a freshly allocated router from the original one (default: copy rows, sample the new ones)."""
        copy_original_rows(router, original, generator)

    def make_generator(self, device) -> torch.Generator | None:
        """One generator for a whole model's new rows, from ``seed`` (``None``: torch's global RNG). ``inject``
        draws every layer from it in turn, so each layer gets its own noise, as independent draws would."""
        seed = getattr(self, "seed", None)
        return None if seed is None else torch.Generator(device=device).manual_seed(seed)

    def build(self, original: nn.Module, dims: MoEDims, scoring: RouterScoring, *, init: bool = True,
              generator: torch.Generator | None = None) -> BaseRouter:
        """Router module replacing ``original``. ``init=False`` only allocates (weights come from a checkpoint).
        ``generator``: the model-wide one from :meth:`make_generator` (default: a fresh one from ``seed``)."""
        router = self.make_router(
            dims,
            scoring,
            has_bias=getattr(original, "bias", None) is not None,
            has_correction_bias=getattr(original, "e_score_correction_bias", None) is not None,
        )
        router.to(device=original.weight.device)
        for p in router.parameters():  # router rows in the original's dtype; the correction bias stays fp32
            p.data = p.data.to(original.weight.dtype)
        if init and not original.weight.is_meta:
            gen = generator if generator is not None else self.make_generator(original.weight.device)
            self.init_router(router, original, gen)
        return router

    def connect(self, routers: list[BaseRouter], skip_hooks: list) -> None:
        """Called by ``inject`` after the swap with the new routers in layer order and their experts' skip hooks
        (``SentinelSkip``): variants with cross-layer state or zero-GEMM outputs (MoE++) wire themselves here."""

    def init_args(self) -> dict[str, Any]:
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self"}

    def to_config(self) -> dict[str, Any]:
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"


ROUTING_VARIANTS: dict[str, type[RoutingVariant]] = {}


def register_routing(name: str):
    """Class decorator adding a variant to the name registry."""

    def wrap(cls: type[RoutingVariant]) -> type[RoutingVariant]:
        if name in ROUTING_VARIANTS:
            raise ValueError(f"routing variant {name!r} is already registered by {ROUTING_VARIANTS[name]}")
        cls.name = name
        ROUTING_VARIANTS[name] = cls
        return cls

    return wrap


def get_routing(name: str, **kwargs: Any) -> RoutingVariant:
    """Build a registered variant by name: ``get_routing("zero_experts", num_zero_experts=4)``."""
    if name not in ROUTING_VARIANTS:
        raise ValueError(f"unknown routing variant {name!r}; registered: {sorted(ROUTING_VARIANTS)}")
    return ROUTING_VARIANTS[name](**kwargs)


def _registered_class(class_path: str) -> type[RoutingVariant] | None:
    """The registered variant a saved ``class_path`` names: its registry name, its defining module path or its
    ``zeda_lightning.routing`` alias. Nothing is imported: only classes already registered can match."""
    for name, cls in ROUTING_VARIANTS.items():
        aliases = {name, cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}", f"zeda_lightning.routing.{cls.__qualname__}"}
        if class_path in aliases:
            return cls
    return None


def _type_ok(value: Any, annotation: Any) -> bool:
    """``value`` fits a simple annotation (int, float, bool, str, None, unions, Literal, list/tuple of those)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple, collections.abc.Sequence):
        args = typing.get_args(annotation)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple))
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def check_init_args(cls: type[RoutingVariant], init_args: Any, where: str = "routing") -> dict[str, Any]:
    """Check ``init_args`` against ``cls.__init__``'s signature: known names, values of the annotated types.

    Values from a file (a model's ``config.json``, a dict in YAML) are checked here before the class sees them.
    """
    if not isinstance(init_args, dict):
        raise ValueError(f"{where}: init_args of {cls.__name__} must be a mapping, got {init_args!r}")
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    hints = typing.get_type_hints(cls.__init__)
    unknown = sorted(set(init_args) - set(params))
    if unknown:
        raise ValueError(f"{where}: {cls.__name__} has no argument(s) {unknown}; it takes {sorted(params)}")
    for key, value in init_args.items():
        annotation = hints.get(key, params[key].annotation)
        if not _type_ok(value, annotation):
            shown = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
            raise ValueError(f"{where}: {cls.__name__}.{key} must be {shown}, got {value!r} "
                             f"({type(value).__name__})")
    return dict(init_args)


def routing_from_config(cfg: Any, where: str = "routing") -> RoutingVariant:
    """Rebuild a variant from ``to_config()`` output (the ``zeda_routing`` entry of a saved ``config.json``).

    The ``class_path`` is resolved only through the registry (:func:`register_routing`): a name read from a model
    directory or a checkpoint never imports a module. Register a research variant in your own code before loading
    a model that uses it. ``init_args`` are type-checked against the variant's signature.
    """
    if not isinstance(cfg, dict) or not isinstance(cfg.get("class_path"), str):
        raise ValueError(f"{where}: a routing config is a mapping with a 'class_path' string, got {cfg!r}")
    class_path = cfg["class_path"]
    cls = _registered_class(class_path)
    if cls is None:
        raise ValueError(
            f"{where}: routing class_path {class_path!r} is not a registered routing variant (registered: "
            f"{sorted(ROUTING_VARIANTS)}); names read from a model or checkpoint are never imported: import the "
            "module that defines it (decorated with @register_routing) in your own code first"
        )
    extra = sorted(set(cfg) - {"class_path", "init_args"})
    if extra:
        raise ValueError(f"{where}: unexpected routing config keys {extra}; expected class_path and init_args")
    return cls(**check_init_args(cls, cfg.get("init_args", {}) or {}, where))


def iter_routers(model: nn.Module):
    """Injected routers in layer order."""
    return (m for m in model.modules() if isinstance(m, BaseRouter))


@contextlib.contextmanager
def capture_routing(model: nn.Module, accumulate: bool = False):
    """Collect each injected router's :class:`RouterOutput` during the forwards inside the block.

    Yields ``{layer_idx: RouterOutput}``: the last forward wins, so an activation-checkpoint recompute overwrites
    instead of duplicating. ``accumulate=True`` yields ``{layer_idx: [RouterOutput, ...]}`` with one entry per
    forward (incremental decoding: prefill, then one entry per generated token).
    """
    records: dict[int, Any] = {}

    def put(layer: int, out: RouterOutput) -> None:
        if accumulate:
            records.setdefault(layer, []).append(out)
        else:
            records[layer] = out

    routers = list(iter_routers(model))
    for r in routers:
        r._sink = put
    try:
        yield records
    finally:
        for r in routers:
            r._sink = None


@contextlib.contextmanager
def replay_routing(model: nn.Module, selected: dict[int, Tensor]):
    """Force each router to use the given pool ids ``{layer_idx: (T, K)}`` (-1 = select as usual)."""
    routers = {r.layer_idx: r for r in iter_routers(model)}
    missing = sorted(set(routers) - set(selected))
    if missing:
        raise ValueError(f"routing replay lacks layers {missing}")
    for layer, r in routers.items():
        r._replay = selected[layer]
    try:
        yield
    finally:
        for r in routers.values():
            r._replay = None
