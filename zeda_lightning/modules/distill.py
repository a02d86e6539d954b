"""``ZedaDistillModule``: a frozen teacher, a student with injected routing, and self-distillation.

The module orchestrates; models are built by ``modules.builders``, losses are components from ``losses`` (chosen in
YAML), metrics live in ``metrics``. Override points for research code, used by stage 1 and stage 2 alike:
``student_forward``, ``teacher_forward``, ``distill_loss``, ``aux_loss``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer
from typing_extensions import override

from zeda_lightning.analysis import slot_counts, zero_ratio
from zeda_lightning.checkpointing import check_fits, checkpoint_meta
from zeda_lightning.losses.objectives import Objective, make_objective
from zeda_lightning.losses.router_losses import RouterLoss, make_router_loss
from zeda_lightning.metrics import DistillMetrics
from zeda_lightning.modules.base import DivergenceError, TrainModuleBase
from zeda_lightning.modules.builders import (
    ModelSpec,
    Models,
    TeacherMode,
    Trainable,
    build_for,
    check_student_dir,
    check_teacher_dir,
    meta_student,
)
from zeda_lightning.modules.teacher import zero_experts_masked
from zeda_lightning.routing.base import (
    RouterOutput,
    RoutingVariant,
    capture_routing,
    iter_routers,
    replay_routing,
    routing_from_config,
    supports,
)
from zeda_lightning.routing.zero_experts import ZeroExperts
from zeda_lightning.sharding import strategy_kind


class ZedaDistillModule(TrainModuleBase):
    """Self-distil a student (the teacher plus injected routing) from its frozen original.

    Args:
        teacher: transformers directory of the original MoE (frozen).
        student: directory to initialise the student from (e.g. a stage-1 export); default: the teacher.
        routing: routing variant injected into the student (``class_path`` in YAML); default ``ZeroExperts()``.
        objective: an ``Objective`` (``class_path`` in YAML) or a shorthand: ``sft`` = cross-entropy on
            teacher-sampled responses (the paper's stage 1); ``forward_kl``, ``reverse_kl``, ``jsd`` on full teacher
            logits (with ``kl_temperature``, ``beta``).
        beta: JSD mixing weight (``jsd`` shorthand only).
        kl_temperature: softmax temperature of the KL shorthands.
        aux_loss: a ``RouterLoss`` (``class_path``) or a shorthand: ``group`` (ZEDA's L_GA with ``group_alpha``,
            ``group_w``), ``switch`` (Switch balance over the whole pool, for null experts, ``switch_coef``), ``none``.
        group_alpha: L_GA's alpha (paper: 0.1).
        group_w: L_GA's w; the zero share settles at ``w N_Z / (w N_Z + N)`` (paper: 2 -> 0.5).
        switch_coef: Switch balance coefficient.
        z_loss_coef: router z-loss coefficient added to ``aux_loss`` (0 = off).
        trainable: ``full`` (paper), ``router_only``, ``router_and_experts``.
        teacher_mode: ``separate`` (own frozen copy) or ``shared_weights`` (only with ``router_only`` and a maskable
            routing: the teacher is the student with zero experts masked, one copy of the weights in memory).
        allow_zeda_teacher: accept a zeda export (a model with injected routers) as the teacher.
        temperature: removed (it meant the KL temperature here and the sampling one in stage 2): use ``kl_temperature``.
    """

    def __init__(
        self,
        teacher: str,
        student: str | None = None,
        routing: RoutingVariant | dict | None = None,
        objective: Objective | str = "sft",
        beta: float = 0.5,
        kl_temperature: float = 1.0,
        aux_loss: RouterLoss | str = "group",
        group_alpha: float = 0.1,
        group_w: float = 2.0,
        switch_coef: float = 0.02,
        z_loss_coef: float = 0.0,
        trainable: Trainable = "full",
        teacher_mode: TeacherMode = "separate",
        allow_zeda_teacher: bool = False,
        temperature: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if temperature is not None:
            raise ValueError(f"{type(self).__name__}: 'temperature' is ambiguous and was removed; set kl_temperature "
                             "(the KL objectives' softmax temperature)")
        routing = ZeroExperts() if routing is None else routing
        if isinstance(routing, dict):
            routing = routing_from_config(routing, where="model.init_args.routing")
        self.objective = make_objective(objective, temperature=kl_temperature, beta=beta)
        self.router_loss = make_router_loss(aux_loss, group_alpha=group_alpha, group_w=group_w,
                                            switch_coef=switch_coef, z_loss_coef=z_loss_coef)
        self.spec = ModelSpec(teacher, student, routing, trainable, teacher_mode, self.activation_checkpointing)
        needs = self.router_loss.requires
        if needs is not None and not supports(routing, needs):
            raise ValueError(f"aux_loss {self.router_loss!r} needs a routing with {needs!r}, which "
                             f"{type(routing).__name__} does not declare; use aux_loss='switch' or 'none'")
        self.teacher_cfg = check_teacher_dir(teacher, allow_zeda_export=allow_zeda_teacher)
        if student is not None:
            check_student_dir(student, routing, self.teacher_cfg)
        self.save_hyperparameters(ignore=["optimizer", "routing", "objective", "aux_loss"])
        self.hparams.update(routing=routing.to_config(), objective=self.objective.to_config(),
                            aux_loss=self.router_loss.to_config())
        self.teacher_path, self.student_path, self.routing = teacher, student, routing
        self.student: nn.Module | None = None
        self.teacher = None  # a FrozenTeacher, outside the module tree; None with shared_weights
        self.eval_metrics: DistillMetrics | None = None

    # -- building ----------------------------------------------------------------------------------------------
    @override
    def configure_model(self) -> None:
        if self.student is None:
            self.use_models(build_for(self.spec, getattr(self, "_trainer", None)))

    def use_models(self, models: Models) -> None:
        """Adopt a built student and teacher (from any ``modules.builders`` builder): refuse a non-finite teacher,
        set up the held-out metrics."""
        self.student, self.teacher = models
        self._check_teacher_weights()
        trainer = getattr(self, "_trainer", None)
        domains = list(getattr(getattr(trainer, "datamodule", None), "domains", []) or [])
        routers = list(iter_routers(self.student))
        self.eval_metrics = DistillMetrics(sorted(r.layer_idx for r in routers), domains, routers[0].top_k)

    def _check_teacher_weights(self) -> None:
        """A teacher with NaN / inf weights would poison every loss: refused before the first step."""
        error, anywhere = self.nonfinite_weights((self.teacher or self.student).named_parameters(),
                                                 f"teacher {self.teacher_path}")
        if anywhere:
            error = error or FloatingPointError(f"teacher {self.teacher_path}: NaN or inf weights on another rank")
            raise ValueError(f"{error}; the teacher must be finite: re-download or re-export it")

    # -- override points -------------------------------------------------------------------------------------
    def student_forward(self, batch: dict[str, Tensor], replay: dict[int, Tensor] | None = None,
                        ) -> tuple[Tensor, dict[int, RouterOutput]]:
        """Student logits (B, S, V) and its routing records ``{layer: RouterOutput}``; ``replay`` forces the
        expert choices ``{layer: (T, K) pool ids}`` (stage 2's routing replay)."""
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        if replay is None:
            with capture_routing(self.student) as records:
                logits = self.student(**kwargs).logits
        else:
            with replay_routing(self.student, replay), capture_routing(self.student) as records:
                logits = self.student(**kwargs).logits
        return logits, dict(records)

    @torch.no_grad()
    def teacher_forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Teacher logits (B, S, V), never with gradient."""
        kwargs = {k: batch.get(k) for k in ("input_ids", "attention_mask", "position_ids")}
        if self.teacher is None:
            with zero_experts_masked(self.student):
                return self.student(**kwargs).logits
        self.teacher.follow(self.student)
        return self.teacher(**kwargs)

    def distill_loss(self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor) -> Tensor:
        """Per-token distillation loss on shifted positions (labels (B, S) with -100 where nothing is learnt)."""
        return self.objective(student_logits, teacher_logits, labels)

    def aux_loss(self, records: dict[int, RouterOutput], token_mask: Tensor) -> Tensor:
        """Router losses summed over layers."""
        return self.router_loss(list(records.values()), token_mask)

    # -- steps -------------------------------------------------------------------------------------------------
    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        token_mask = batch["attention_mask"].reshape(-1).bool()  # (T,)
        student_logits, records = self.student_forward(batch)
        teacher_logits = self.teacher_forward(batch) if stage != "train" or self.objective.needs_teacher else None
        if teacher_logits is not None and not getattr(self, "_teacher_logits_checked", False):
            if not bool(torch.isfinite(teacher_logits).all()):
                raise ValueError(f"teacher {self.teacher_path} gives NaN or inf logits on the first {stage} batch; "
                                 "the teacher must be finite: check its weights and dtype")
            self._teacher_logits_checked = True
        distill = self.distill_loss(student_logits, teacher_logits, batch["labels"])
        aux = self.aux_loss(records, token_mask)
        if stage != "train":
            domain = batch.get("domain") if self.eval_metrics.domains else None
            counts = slot_counts(records, batch["attention_mask"], domain, max(len(self.eval_metrics.domains), 1))
            self.eval_metrics.update(student_logits, teacher_logits, batch["labels"], *counts)
            return distill + aux
        self.check_finite({"distillation": distill, "aux": aux},
                          detail=lambda name: self.nonfinite_layers(records, token_mask) if name == "aux" else None)
        loss = distill + aux
        self.tally_train_slots(records, token_mask)
        # NOTE: averaged over processes, so a sharded run logs the same curve as one process with its global batch
        self.log_train({"loss": loss, "distill_loss": distill, "aux_loss": aux,
                        "zero_ratio": zero_ratio(records, token_mask)}, batch["input_ids"].shape[0])
        return loss

    def log_train(self, values: dict[str, Tensor | float], batch_size: int) -> None:
        """``train/<name>`` averaged over processes (loss and zero ratio on the progress bar)."""
        for name, value in values.items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "zero_ratio", "reverse_kl"),
                     batch_size=batch_size, sync_dist=True)

    @override
    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    @override
    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    @override
    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def nonfinite_layers(self, records: dict[int, RouterOutput], token_mask: Tensor) -> str:
        """Which layers' router loss or logits are NaN / inf (for the divergence error)."""
        bad = [layer for layer, rec in sorted(records.items())
               if not bool(torch.isfinite(self.aux_loss({layer: rec}, token_mask)).all())
               or not bool(torch.isfinite(rec.router_logits[rec.router_logits > float("-inf")]).all())]
        return f"router layers {bad}" if bad else ""

    def _log_eval(self, stage: str) -> None:
        for name, value in self.eval_metrics.results().items():
            if "/" not in name and not bool(torch.isfinite(value).all()):
                raise DivergenceError(f"{stage}/{name} is {float(value)} at step {self.global_step}: the "
                                      f"{'teacher' if name == 'teacher_nll' else 'student'} gives NaN or inf; "
                                      "nothing was saved after it; resume from the last checkpoint")
            self.log(f"{stage}/{name}", value, prog_bar=name in ("nll", "zero_ratio"))
        self.eval_metrics.reset()

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # -- checkpoints, export and checks -------------------------------------------------------------------------
    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for key in [k for k in checkpoint.get("state_dict", {}) if k.startswith("teacher.")]:
            del checkpoint["state_dict"][key]  # written by versions that kept the teacher in the module tree

    @override
    def export_model_and_tokenizer(self):
        tok_dir = self.spec.source
        tok = (AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
               if os.path.isfile(os.path.join(tok_dir, "tokenizer_config.json")) else None)
        return self.student, tok

    @override
    def check_run(self, trainer, datamodule=None, ckpt_path: str | None = None, stage: str = "fit") -> str | None:
        if self.spec.teacher_mode == "shared_weights" and strategy_kind(trainer) == "fsdp1":
            raise ValueError("teacher_mode='shared_weights' keeps a frozen copy of the original router rows, which "
                             "FSDP1's flattened parameters cannot hold; use ModelParallelStrategy (FSDP2) or "
                             "teacher_mode='separate'")
        return super().check_run(trainer, datamodule, ckpt_path, stage)

    @override
    def protected_paths(self, trainer) -> list[str]:
        sources = [self.teacher_path, self.student_path, getattr(getattr(trainer, "datamodule", None), "tokenizer_path", None)]
        return super().protected_paths(trainer) + [p for p in sources if p]

    @override
    def check_resume(self, path: str) -> None:
        """The user's config decides what runs; a checkpoint only restores state, and only one of this model:
        same routing config and the same tensor shapes (refused before anything is written, naming both)."""
        expected = {f"student.{k}": tuple(v.shape) for k, v in self.meta_student().state_dict().items()}
        legacy = check_fits(path, checkpoint_meta(path), self.hparams["routing"], expected, "student.",
                            f"{self.spec.source} + {type(self.routing).__name__}", role="student")
        if legacy:  # restored at their defaults: a partial load
            self.strict_loading = False

    def meta_student(self) -> nn.Module:
        """The configured student on the meta device (shapes and names only, no weights read)."""
        return meta_student(self.spec)

    @override
    def preflight(self, datamodule=None) -> None:
        super().preflight(datamodule)
        if datamodule is not None and hasattr(datamodule, "check"):
            datamodule.check()
            tok, vocab = datamodule.tokenizer, self.teacher_cfg.get("vocab_size")
            if tok is not None and vocab is not None and len(tok) > vocab:
                raise ValueError(f"tokenizer {datamodule.tokenizer_path} has {len(tok)} tokens but teacher "
                                 f"{self.teacher_path} has vocab_size {vocab}; use the teacher's tokenizer")


__all__ = ["ZedaDistillModule", "check_teacher_dir", "zero_experts_masked"]
