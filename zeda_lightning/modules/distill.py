"""``ZedaDistillModule``: a frozen teacher, a student with injected routing, and self-distillation.

The module orchestrates; the math lives in ``zeda_lightning.losses``. Override points for research code:
``student_forward``, ``teacher_forward``, ``distill_loss``, ``aux_loss``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

from zeda_lightning import sharding
from zeda_lightning.adapters import ADAPTERS, CONFIG_KEY, adapter_for, inject, set_zero_mask
from zeda_lightning.losses import (
    cross_entropy,
    forward_kl,
    jsd,
    reverse_kl,
    token_kl,
    total_group_aux_loss,
    total_router_z_loss,
    total_switch_load_balance_loss,
)
from zeda_lightning.metrics import GroupedRatio
from zeda_lightning.modules.base import TrainModuleBase
from zeda_lightning.routing import BaseRouter, ZeroExpertRouter, RouterOutput, RoutingVariant, ZeroExperts, capture_routing, routing_from_config

Objective = Literal["sft", "forward_kl", "reverse_kl", "jsd"]
AuxLoss = Literal["group", "switch", "none"]
Trainable = Literal["full", "router_only", "router_and_experts"]
TeacherMode = Literal["separate", "shared_weights"]


def check_teacher_dir(path: str, *, role: str = "teacher", allow_zeda_export: bool = True) -> dict:
    """Validate a teacher directory on the meta device (no weights read): supported family with MoE layers.

    ``allow_zeda_export=False`` refuses a zeda export (a distilled student): as a teacher it would silently make
    the student distil from an earlier student, e.g. after an export was written over the teacher's directory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from zeda_lightning.export import check_model_dir

    cfg = check_model_dir(path)
    if not allow_zeda_export and CONFIG_KEY in cfg:
        raise ValueError(
            f"{role} {path} is a zeda export (its config.json has {CONFIG_KEY!r}: injected routers), not an original "
            "model; give the original model as teacher, or set allow_zeda_teacher: true to distil from an export")
    if cfg.get("model_type") not in ADAPTERS:
        raise ValueError(
            f"teacher {path}: model_type {cfg.get('model_type')!r} is not a supported MoE family; "
            f"supported: {sorted(ADAPTERS)}"
        )
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if not adapter_for(model).find_blocks(model):
        raise ValueError(f"teacher {path} has no MoE layer: there is no router to add zero experts to")
    return cfg


def _load(path: str) -> nn.Module:
    from zeda_lightning.export import from_pretrained

    return from_pretrained(path, dtype=torch.float32)


@contextlib.contextmanager
def zero_experts_masked(model: nn.Module):
    """Temporarily mask zero experts (the student becomes exactly the original model)."""
    set_zero_mask(model, True)
    try:
        yield model
    finally:
        set_zero_mask(model, False)


class ZedaDistillModule(TrainModuleBase):
    """Self-distil a student (the teacher plus injected routing) from its frozen original.

    Args:
        teacher: transformers directory of the original MoE (frozen).
        student: directory to initialise the student from (e.g. a stage-1 export); default: the teacher.
        routing: routing variant injected into the student (``class_path`` in YAML); default ``ZeroExperts()``.
        objective: ``sft`` = cross-entropy on teacher-sampled responses (the paper's stage 1); ``forward_kl``,
            ``reverse_kl``, ``jsd`` on full teacher logits.
        beta: JSD mixing weight (``jsd`` only).
        temperature: softmax temperature of the KL objectives.
        aux_loss: ``group`` (ZEDA's L_GA), ``switch`` (Switch balance over the whole pool, for null experts), ``none``.
        group_alpha: L_GA's alpha (paper: 0.1).
        group_w: L_GA's w; the zero share settles at ``w N_Z / (w N_Z + N)`` (paper: 2 -> 0.5).
        switch_coef: Switch balance coefficient.
        z_loss_coef: router z-loss coefficient (0 = off).
        trainable: ``full`` (paper), ``router_only``, ``router_and_experts``.
        allow_zeda_teacher: accept a zeda export (a model with injected routers) as the teacher.
        teacher_mode: ``separate`` (own frozen copy) or ``shared_weights`` (only with ``router_only`` and zero experts:
            the teacher is the student with zero experts masked, one copy of the weights in memory).
    """

    def __init__(
        self,
        teacher: str,
        student: str | None = None,
        routing: RoutingVariant | dict | None = None,
        objective: Objective = "sft",
        beta: float = 0.5,
        temperature: float = 1.0,
        aux_loss: AuxLoss = "group",
        group_alpha: float = 0.1,
        group_w: float = 2.0,
        switch_coef: float = 0.02,
        z_loss_coef: float = 0.0,
        trainable: Trainable = "full",
        teacher_mode: TeacherMode = "separate",
        allow_zeda_teacher: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        routing = ZeroExperts() if routing is None else routing
        if isinstance(routing, dict):
            routing = routing_from_config(routing, where="model.init_args.routing")
        if objective not in Objective.__args__:
            raise ValueError(f"objective must be one of {Objective.__args__}, got {objective!r}")
        if aux_loss not in AuxLoss.__args__:
            raise ValueError(f"aux_loss must be one of {AuxLoss.__args__}, got {aux_loss!r}")
        if trainable not in Trainable.__args__:
            raise ValueError(f"trainable must be one of {Trainable.__args__}, got {trainable!r}")
        if teacher_mode == "shared_weights" and (trainable != "router_only" or not isinstance(routing, ZeroExperts)):
            raise ValueError(
                "teacher_mode='shared_weights' needs trainable='router_only' and ZeroExperts routing (the teacher is "
                "the student with zero experts masked, so only router rows may change); use teacher_mode='separate'"
            )
        if teacher_mode == "shared_weights" and student is not None:
            raise ValueError("teacher_mode='shared_weights' derives the teacher from the student's own weights; "
                             "it cannot start from a separate student checkpoint (use teacher_mode='separate')")
        if aux_loss == "group" and not isinstance(routing, ZeroExperts):
            raise ValueError(f"aux_loss='group' (L_GA) needs ZeroExperts routing, got {type(routing).__name__}; "
                             "use aux_loss='switch' or 'none'")
        self.teacher_cfg = check_teacher_dir(teacher, allow_zeda_export=allow_zeda_teacher)
        if student is not None:
            student_cfg = check_teacher_dir(student, role="student")
            if student_cfg.get("vocab_size") != self.teacher_cfg.get("vocab_size"):
                raise ValueError(
                    f"teacher/student vocab mismatch: {teacher} has vocab_size {self.teacher_cfg.get('vocab_size')}, "
                    f"{student} has {student_cfg.get('vocab_size')}; distil between models sharing a tokenizer"
                )
            saved = student_cfg.get(CONFIG_KEY)
            if saved is not None:
                saved = routing_from_config(saved, where=f"student {student} config.json").to_config()
            if saved is not None and saved != routing.to_config():
                raise ValueError(
                    f"student {student} was trained with routing {saved}, but this run asks for {routing.to_config()}; "
                    "use the same routing config (or start from the original teacher)"
                )
        self.save_hyperparameters(ignore=["optimizer", "routing"])
        self.hparams["routing"] = routing.to_config()
        self.teacher_path, self.student_path = teacher, student
        self.routing = routing
        self.objective, self.beta, self.temperature = objective, beta, temperature
        self.aux_kind, self.group_alpha, self.group_w = aux_loss, group_alpha, group_w
        self.switch_coef, self.z_loss_coef = switch_coef, z_loss_coef
        self.trainable, self.teacher_mode = trainable, teacher_mode
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self.domains: list[str] = []
        self.strict_loading = False  # checkpoints leave the frozen teacher out

    # -- building ----------------------------------------------------------------------------------------------
    @override
    def configure_model(self) -> None:
        if self.student is not None:
            return
        trainer = getattr(self, "_trainer", None)
        kind = sharding.strategy_kind(trainer) if trainer is not None else None
        if kind == "fsdp2":
            self._configure_fsdp2(sharding.data_parallel_mesh(self), *sharding.param_dtypes(trainer))
        elif kind == "fsdp1":
            self._configure_fsdp1(trainer.global_rank == 0)
        else:
            self._configure_local()
        self._check_teacher_weights()
        self._build_metrics()

    def _check_teacher_weights(self) -> None:
        """Refuse a teacher with NaN / inf weights before the first step (its logits would poison every loss)."""
        from zeda_lightning.checkpointing import check_finite_state

        teacher = self.teacher if self.teacher is not None else self.student
        error = None
        try:
            check_finite_state(teacher.named_parameters(), f"teacher {self.teacher_path}")
        except FloatingPointError as err:
            error = err
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.strategy.reduce_boolean_decision(error is not None, all=False):
            error = error or FloatingPointError(f"teacher {self.teacher_path}: NaN or inf weights on another rank")
        if error is not None:
            raise ValueError(f"{error}; the teacher must be finite: re-download or re-export it")

    def _configure_local(self) -> None:
        """One full copy of each model per process (single device, DDP, or before FSDP1 wraps it)."""
        student = _load(self.student_path or self.teacher_path)
        if not any(isinstance(m, BaseRouter) for m in student.modules()):
            inject(student, self.routing)
        self.student = student.train()
        self._set_trainable(self.student)
        if self.activation_checkpointing:
            sharding.enable_activation_checkpointing(self.student)
        if self.teacher_mode == "shared_weights":
            self._freeze_original_rows()
        else:
            teacher = _load(self.teacher_path)
            teacher.config.output_router_logits = False  # inference only: no balance loss to compute
            teacher.requires_grad_(False)
            self.teacher = teacher.eval()

    def _configure_fsdp2(self, mesh, storage: torch.dtype, compute: torch.dtype | None) -> None:
        """Student and teacher built on the meta device, sharded per decoder layer, filled shard by shard.

        The teacher is kept outside the module tree: checkpoints, the optimiser and Lightning's device moves never
        see it (it is re-read from its safetensors on resume), and with bf16 compute it is stored in bf16 (no master
        weights to keep for a frozen model).
        """
        self.student = sharding.load_sharded(
            self.student_path or self.teacher_path, mesh, routing=self.routing, dtype=storage, compute_dtype=compute,
            activation_checkpointing=self.activation_checkpointing, configure=self._set_trainable,
        ).train()
        if self.teacher_mode == "shared_weights":
            with sharding.gathered(self.student):
                self._freeze_original_rows()
            return
        teacher = sharding.load_sharded(self.teacher_path, mesh, dtype=compute or storage, compute_dtype=compute)
        teacher.config.output_router_logits = False
        teacher.requires_grad_(False)
        object.__setattr__(self, "teacher", teacher.eval())  # not a submodule (see docstring)

    def _configure_fsdp1(self, rank_zero: bool) -> None:
        """FSDPStrategy (FSDP1, the alternative): rank 0 reads the weights into host memory once, the other ranks
        build on the meta device; each decoder layer and then each model is wrapped with the strategy's settings and
        FSDP broadcasts rank 0's values (``sync_module_states``). The teacher stays outside the module tree."""
        from torch.distributed.fsdp.wrap import wrap

        if rank_zero:
            self._configure_local()
            teacher = self.teacher
        else:
            src = self.student_path or self.teacher_path
            reader = sharding.SafetensorsReader(src)
            fresh = not sharding.read_config(src).get(CONFIG_KEY)
            self.student = sharding.build_empty(src, routing=self.routing if fresh else None, reader=reader).train()
            self._set_trainable(self.student)
            if self.activation_checkpointing:
                sharding.enable_activation_checkpointing(self.student)
            teacher = None if self.teacher_mode == "shared_weights" else sharding.build_empty(self.teacher_path)
            if teacher is not None:
                teacher.requires_grad_(False)
        if teacher is not None:
            teacher.config.output_router_logits = False
            self._modules.pop("teacher", None)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

        def materialise(module: nn.Module) -> None:  # meta ranks: storage only, the values come from rank 0
            module.to_empty(device=device, recurse=False)

        def wrap_model(model: nn.Module) -> nn.Module:
            layers = sharding.decoder_layers(model)
            for i in range(len(layers)):
                layers[i] = wrap(layers[i], sync_module_states=True, param_init_fn=materialise)
            return wrap(model, sync_module_states=True, param_init_fn=materialise)

        self.student = wrap_model(self.student)
        if teacher is not None:
            object.__setattr__(self, "teacher", wrap_model(teacher).eval())

    def _freeze_original_rows(self) -> None:
        for router in self.student.modules():
            if isinstance(router, ZeroExpertRouter):
                router.freeze_original_rows()

    def _set_trainable(self, model: nn.Module) -> None:
        routers = [m for m in model.modules() if isinstance(m, BaseRouter)]
        if self.trainable == "full":
            model.requires_grad_(True)
            return
        model.requires_grad_(False)
        for r in routers:
            r.requires_grad_(True)
        if self.trainable == "router_and_experts":
            adapter = adapter_for(model)
            for _, block in adapter.find_blocks(model):
                block.experts.requires_grad_(True)

    def _build_metrics(self) -> None:
        from torchmetrics import MeanMetric

        dm = getattr(getattr(self, "_trainer", None), "datamodule", None)
        self.domains = list(getattr(dm, "domains", []) or [])
        self.layer_ids = sorted(m.layer_idx for m in self.student.modules() if isinstance(m, BaseRouter))
        self.val_metrics = nn.ModuleDict(
            {
                name: MeanMetric(nan_strategy="disable")  # a NaN must surface, not be dropped with a warning
                for name in ("nll", "teacher_nll", "kl_to_teacher", "top1_agreement", "zero_ratio", "real_experts_per_token")
            }
        )
        self.val_zero_by_layer = GroupedRatio(len(self.layer_ids))
        self.val_zero_by_domain = GroupedRatio(max(len(self.domains), 1))

    @override
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the frozen teacher never leaves eval mode
        return self

    # -- override points -------------------------------------------------------------------------------------
    def student_forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[int, RouterOutput]]:
        """Student logits (B, S, V) and its routing records ``{layer: RouterOutput}``."""
        with capture_routing(self.student) as records:
            logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits, dict(records)

    @torch.no_grad()
    def teacher_forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Teacher logits (B, S, V), never with gradient."""
        if self.teacher is not None:
            model, ctx = self.teacher, contextlib.nullcontext()
        else:
            model, ctx = self.student, zero_experts_masked(self.student)
        with ctx:
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def distill_loss(self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor) -> Tensor:
        """Per-token distillation loss on shifted positions (labels (B, S) with -100 where nothing is learnt)."""
        s, y = student_logits[:, :-1], labels[:, 1:]
        if self.objective == "sft":
            return cross_entropy(s, y)
        t, mask = teacher_logits[:, :-1], y != -100
        if self.objective == "forward_kl":
            return forward_kl(s, t, mask, self.temperature)
        if self.objective == "reverse_kl":
            return reverse_kl(s, t, mask, self.temperature)
        return jsd(s, t, mask, beta=self.beta, temperature=self.temperature)

    def aux_loss(self, records: dict[int, RouterOutput], token_mask: Tensor) -> Tensor:
        """Router losses summed over layers."""
        recs = list(records.values())
        total = recs[0].router_logits.new_zeros((), dtype=torch.float32)
        if self.aux_kind == "group":
            total = total + total_group_aux_loss(recs, alpha=self.group_alpha, w=self.group_w, token_mask=token_mask)
        elif self.aux_kind == "switch":
            total = total + self.switch_coef * total_switch_load_balance_loss(recs, token_mask=token_mask)
        if self.z_loss_coef:
            total = total + self.z_loss_coef * total_router_z_loss(recs, token_mask=token_mask)
        return total

    # -- steps -------------------------------------------------------------------------------------------------
    def _needs_teacher(self, stage: str) -> bool:
        return stage != "train" or self.objective != "sft"

    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        token_mask = batch["attention_mask"].reshape(-1).bool()  # (T,)
        student_logits, records = self.student_forward(batch)
        teacher_logits = self.teacher_forward(batch) if self._needs_teacher(stage) else None
        if teacher_logits is not None and not getattr(self, "_teacher_logits_checked", False):
            if not bool(torch.isfinite(teacher_logits).all()):
                raise ValueError(f"teacher {self.teacher_path} gives NaN or inf logits on the first {stage} batch; "
                                 "the teacher must be finite: check its weights and dtype")
            self._teacher_logits_checked = True
        distill = self.distill_loss(student_logits, teacher_logits, batch["labels"])
        aux = self.aux_loss(records, token_mask)
        if stage == "train":
            self.check_finite({"distillation": distill, "aux": aux},
                              detail=lambda name: self.nonfinite_layers(records, token_mask) if name == "aux" else None)
        loss = distill + aux
        zero_ratio = _zero_ratio(records, token_mask)
        if stage == "train":
            bs = batch["input_ids"].shape[0]
            # NOTE: averaged over processes, so a sharded run logs the same curve as one process with its global batch
            self.log("train/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
            self.log("train/distill_loss", distill, batch_size=bs, sync_dist=True)
            self.log("train/aux_loss", aux, batch_size=bs, sync_dist=True)
            self.log("train/zero_ratio", zero_ratio, prog_bar=True, batch_size=bs, sync_dist=True)
        else:
            self._update_eval_metrics(batch, student_logits, teacher_logits, records, token_mask)
        return loss

    @override
    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    @override
    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    @override
    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    # -- metrics -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_eval_metrics(self, batch, student_logits, teacher_logits, records, token_mask) -> None:
        y = batch["labels"][:, 1:]
        mask = y != -100  # (B, S-1)
        n_tok = mask.sum()
        s = torch.log_softmax(student_logits[:, :-1].float(), -1)
        t = torch.log_softmax(teacher_logits[:, :-1].float(), -1)
        m = self.val_metrics
        if n_tok > 0:
            m["nll"].update(cross_entropy(student_logits[:, :-1], y), n_tok)
            m["teacher_nll"].update(cross_entropy(teacher_logits[:, :-1], y), n_tok)
            m["kl_to_teacher"].update(token_kl(t, s)[mask].mean(), n_tok)
            m["top1_agreement"].update((s.argmax(-1) == t.argmax(-1))[mask].float().mean(), n_tok)
        skipped = torch.stack([records[i].skipped for i in self.layer_ids])  # (L, T, K)
        skipped = skipped[:, token_mask]  # (L, T', K)
        num_layers, num_tok, k = skipped.shape
        if num_tok == 0:
            return
        m["zero_ratio"].update(skipped.float().mean(), skipped.numel())
        m["real_experts_per_token"].update((k - skipped.sum(-1)).float().mean(), num_layers * num_tok)
        self.val_zero_by_layer.update(skipped.sum(dim=(1, 2)).float(), torch.full((num_layers,), float(num_tok * k)))
        if self.domains:
            dom = batch["domain"].clamp_min(0)  # (B,)
            seq_len = batch["input_ids"].shape[1]
            per_seq = torch.stack([records[i].skipped for i in self.layer_ids]).view(num_layers, -1, seq_len, k)
            valid = batch["attention_mask"].bool()  # (B, S)
            num = (per_seq.sum(-1).sum(0) * valid).sum(-1).float()  # (B,) skipped slots over layers
            den = valid.sum(-1).float() * num_layers * k  # (B,)
            g = len(self.domains)
            self.val_zero_by_domain.update(
                torch.zeros(g, device=dom.device).index_add(0, dom, num),
                torch.zeros(g, device=dom.device).index_add(0, dom, den),
            )

    def nonfinite_layers(self, records: dict[int, RouterOutput], token_mask: Tensor) -> str:
        """Which layers' router loss or logits are NaN / inf (for the divergence error)."""
        bad = [layer for layer, rec in sorted(records.items())
               if not bool(torch.isfinite(self.aux_loss({layer: rec}, token_mask)).all())
               or not bool(torch.isfinite(rec.router_logits[rec.router_logits > float("-inf")]).all())]
        return f"router layers {bad}" if bad else ""

    def _log_eval(self, stage: str) -> None:
        from zeda_lightning.modules.base import DivergenceError

        for name, metric in self.val_metrics.items():
            if metric.update_count:
                value = metric.compute()
                if not bool(torch.isfinite(value).all()):
                    raise DivergenceError(f"{stage}/{name} is {float(value)} at step {self.global_step}: the "
                                          f"{'teacher' if name == 'teacher_nll' else 'student'} gives NaN or inf; "
                                          "nothing was saved after it; resume from the last checkpoint")
                self.log(f"{stage}/{name}", value, prog_bar=name in ("nll", "zero_ratio"))
            metric.reset()
        if bool(self.val_zero_by_layer.seen().any()):
            # NOTE: torchmetrics squeezes a one-element result to 0-d (one MoE layer, one domain): keep it 1-d
            for layer, v in zip(self.layer_ids, self.val_zero_by_layer.compute().reshape(-1)):
                self.log(f"{stage}/zero_ratio/layer_{layer}", v)
        self.val_zero_by_layer.reset()
        if self.domains:
            seen = self.val_zero_by_domain.seen().reshape(-1)
            for name, v, ok in zip(self.domains, self.val_zero_by_domain.compute().reshape(-1), seen):
                if ok:
                    self.log(f"{stage}/zero_ratio/{name}", v)
        self.val_zero_by_domain.reset()

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # -- checkpoints and export -----------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    @override
    def export_model_and_tokenizer(self):
        from transformers import AutoTokenizer

        tok_dir = self.student_path or self.teacher_path
        tok = (AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
               if os.path.isfile(os.path.join(tok_dir, "tokenizer_config.json")) else None)
        return self.student, tok

    @override
    def check_run(self, trainer, datamodule=None, ckpt_path: str | None = None, stage: str = "fit") -> str | None:
        if self.teacher_mode == "shared_weights" and sharding.strategy_kind(trainer) == "fsdp1":
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
        from zeda_lightning.checkpointing import checkpoint_meta, checkpoint_shapes

        meta = checkpoint_meta(path)
        hparams = meta.get("hyper_parameters") or {}
        saved = hparams.get("routing") if isinstance(hparams, dict) else None
        if saved is not None:
            try:
                saved = routing_from_config(saved, where=f"checkpoint {path}").to_config()
            except ValueError as err:
                raise ValueError(f"{err}; resume only from checkpoints of this package's runs") from err
        if saved is not None and saved != self.hparams["routing"]:
            raise ValueError(
                f"checkpoint {path} was trained with routing {saved}, but this run asks for {self.hparams['routing']}; "
                "resume with the routing config it was trained with, or start a new run without --ckpt_path"
            )
        expected = {f"student.{k}": tuple(v.shape) for k, v in self.meta_student().state_dict().items()}
        found = {k: v for k, v in checkpoint_shapes(path, meta).items() if k.startswith("student.")}
        wrong = [(k, found[k], expected[k]) for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if wrong or missing or extra:
            what = (f"{wrong[0][0]} has shape {wrong[0][1]} there, this run's model {wrong[0][2]}" if wrong else
                    f"tensors missing from it: {missing[:3]}" if missing else f"tensors this model lacks: {extra[:3]}")
            raise ValueError(f"checkpoint {path} does not fit the configured student ({self.student_path or self.teacher_path}"
                             f" + {type(self.routing).__name__}): {what}; resume with the model it was trained with")

    def meta_student(self) -> nn.Module:
        """The configured student on the meta device (shapes and names only, no weights read)."""
        src = self.student_path or self.teacher_path
        model = sharding.build_empty(src)
        if not any(isinstance(m, BaseRouter) for m in model.modules()):
            inject(model, self.routing, init=False)
        return model

    @override
    def preflight(self, datamodule=None) -> None:
        super().preflight(datamodule)
        if datamodule is not None and hasattr(datamodule, "check"):
            datamodule.check()
            tok = datamodule.tokenizer
            vocab = self.teacher_cfg.get("vocab_size")
            if tok is not None and vocab is not None and len(tok) > vocab:
                raise ValueError(
                    f"tokenizer {datamodule.tokenizer_path} has {len(tok)} tokens but teacher {self.teacher_path} has "
                    f"vocab_size {vocab}; use the teacher's tokenizer"
                )


def _zero_ratio(records: dict[int, RouterOutput], token_mask: Tensor) -> Tensor:
    skipped = torch.stack([r.skipped for r in records.values()])[:, token_mask]  # (L, T', K)
    return skipped.float().mean() if skipped.numel() else skipped.new_zeros((), dtype=torch.float32)


__all__ = ["ZedaDistillModule", "check_teacher_dir", "zero_experts_masked"]
