"""Distillation objectives as components: YAML names one by ``class_path`` (or by its shorthand, ``forward_kl``),
as the optimiser is named; each is a callable on (student logits, teacher logits, labels) over shifted positions.

A research objective subclasses :class:`Objective` in its own module and is named in the user's YAML; nothing here
is resolved from a file the user did not write.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from torch import Tensor

from zeda_lightning.losses.kd import cross_entropy, forward_kl, jsd, reverse_kl


class Objective:
    """``loss = objective(student_logits (B, S, V), teacher_logits (B, S, V) | None, labels (B, S))``: the mean
    per-token loss of predicting token t+1 at position t, over positions whose label is not -100."""

    #: ``False``: the training step skips the teacher forward (SFT on teacher-sampled responses)
    needs_teacher: ClassVar[bool] = True

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor) -> Tensor:
        s, y = student_logits[:, :-1], labels[:, 1:]
        if not self.needs_teacher:
            return self.loss(s, None, y)
        if teacher_logits is None:
            raise ValueError(f"{type(self).__name__} needs teacher logits")
        return self.loss(s, teacher_logits[:, :-1], y)

    def loss(self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor) -> Tensor:
        """The loss on already shifted tensors (student / teacher (B, S-1, V), labels (B, S-1))."""
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        cls = type(self)
        params = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}",
                "init_args": {k: getattr(self, k) for k in params if hasattr(self, k)}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_config()['init_args'].items())})"


class SFT(Objective):
    """Cross-entropy on the data's own tokens (teacher-sampled responses: ZEDA's stage 1); no teacher forward."""

    needs_teacher = False

    def loss(self, student_logits, teacher_logits, labels):
        return cross_entropy(student_logits, labels)


class ForwardKL(Objective):
    """KL(teacher || student) on the full teacher distribution at every labelled position (mass-covering)."""

    def __init__(self, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"{type(self).__name__}: temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def loss(self, student_logits, teacher_logits, labels):
        return forward_kl(student_logits, teacher_logits, labels != -100, self.temperature)


class ReverseKL(ForwardKL):
    """KL(student || teacher) on the full distributions (mode-seeking)."""

    def loss(self, student_logits, teacher_logits, labels):
        return reverse_kl(student_logits, teacher_logits, labels != -100, self.temperature)


class JSD(Objective):
    """Generalised Jensen-Shannon divergence with mixing weight ``beta`` (GKD)."""

    def __init__(self, beta: float = 0.5, temperature: float = 1.0) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"JSD: beta must be in [0, 1], got {beta}")
        if temperature <= 0:
            raise ValueError(f"JSD: temperature must be > 0, got {temperature}")
        self.beta, self.temperature = beta, temperature

    def loss(self, student_logits, teacher_logits, labels):
        return jsd(student_logits, teacher_logits, labels != -100, beta=self.beta, temperature=self.temperature)


#: shorthand names accepted in YAML (``objective: forward_kl``), built with the module's ``kl_temperature`` / ``beta``
OBJECTIVES: dict[str, type[Objective]] = {"sft": SFT, "forward_kl": ForwardKL, "reverse_kl": ReverseKL, "jsd": JSD}


def from_saved_config(cfg: Any, classes: list[type], where: str) -> Any:
    """Rebuild a component from its ``to_config()`` (saved in a checkpoint's hyperparameters): only the package's
    own classes, by exact ``class_path``, with numeric init_args; nothing is imported because a file named it."""
    known = {f"{c.__module__}.{c.__qualname__}": c for c in classes}
    if not isinstance(cfg, dict) or cfg.get("class_path") not in known or not isinstance(cfg.get("init_args", {}), dict):
        raise ValueError(f"{where}: {cfg!r} is not a saved config of one of {sorted(known)}; a saved component is "
                         "rebuilt only from this package's classes: set it in your YAML")
    cls, init = known[cfg["class_path"]], dict(cfg.get("init_args") or {})
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    bad = [k for k, v in init.items() if k not in params or not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"{where}: {cls.__name__} init_args {bad} are unknown or not numbers")
    return cls(**init)


def make_objective(spec: str | Objective | dict, *, temperature: float = 1.0, beta: float = 0.5) -> Objective:
    """The objective a config names: an :class:`Objective` as given, a shorthand built with the shared knobs, or a
    saved config of one of the package's objectives (from a checkpoint)."""
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, dict):
        return from_saved_config(spec, list(OBJECTIVES.values()), "objective")
    if not isinstance(spec, str) or spec not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)} or an Objective (class_path in YAML), "
                         f"got {spec!r}")
    cls = OBJECTIVES[spec]
    if cls is SFT:
        return SFT()
    return JSD(beta=beta, temperature=temperature) if cls is JSD else cls(temperature=temperature)
