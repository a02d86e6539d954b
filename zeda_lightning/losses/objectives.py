"""Distillation objectives as components: YAML names one by ``class_path`` (or by its shorthand, ``forward_kl``),
as the optimiser is named; each is a callable on (student logits, teacher logits, labels) over shifted positions.

A research objective subclasses :class:`Objective` in its own module and is named in the user's YAML; nothing here
is resolved from a file the user did not write.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from zeda_lightning.losses.component import Component, from_saved_config
from zeda_lightning.losses.kd import cross_entropy, forward_kl, jsd, reverse_kl


class Objective(Component):
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
