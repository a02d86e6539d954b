"""Building the student (teacher + injected routing, trainable preset applied) and its frozen teacher: one public
builder per strategy, each returning :class:`Models`. The training module picks one by its trainer's strategy;
benches and tests call them directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.distributed.fsdp.wrap import wrap
from transformers import AutoConfig, AutoModelForCausalLM

from zeda_lightning.adapters.base import ADAPTERS, CONFIG_KEY, adapter_for, inject
from zeda_lightning.export import check_model_dir, from_pretrained
from zeda_lightning.modules.teacher import FrozenTeacher
from zeda_lightning.routing.base import MASKABLE, BaseRouter, RoutingVariant, iter_routers, routing_from_config, supports
from zeda_lightning.sharding import (
    SafetensorsReader,
    build_empty,
    decoder_layers,
    enable_activation_checkpointing,
    gathered,
    load_sharded,
    param_dtypes,
    read_config,
    strategy_kind,
)

Trainable = Literal["full", "router_only", "router_and_experts"]
TeacherMode = Literal["separate", "shared_weights"]


def check_teacher_dir(path: str, *, role: str = "teacher", allow_zeda_export: bool = True) -> dict:
    """Validate a model directory on the meta device (no weights read): a supported family with MoE layers.
    Returns its ``config.json``.

    ``allow_zeda_export=False`` refuses a zeda export (a distilled student): as a teacher it would silently make
    the student distil from an earlier student, e.g. after an export was written over the teacher's directory.
    """
    cfg = check_model_dir(path)
    if not allow_zeda_export and CONFIG_KEY in cfg:
        raise ValueError(
            f"{role} {path} is a zeda export (its config.json has {CONFIG_KEY!r}: injected routers), not an original "
            "model; give the original model as teacher, or set allow_zeda_teacher: true to distil from an export")
    if cfg.get("model_type") not in ADAPTERS:
        raise ValueError(
            f"{role} {path}: model_type {cfg.get('model_type')!r} is not a supported MoE family; "
            f"supported: {sorted(ADAPTERS)}"
        )
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if not adapter_for(model).find_blocks(model):
        raise ValueError(f"{role} {path} has no MoE layer: there is no router to add zero experts to")
    return cfg


def check_student_dir(path: str, routing: RoutingVariant, teacher_cfg: dict) -> dict:
    """A student to start from (e.g. a stage-1 export): a supported MoE with the teacher's vocabulary, and, if it
    is a zeda export, trained with this run's routing config."""
    cfg = check_teacher_dir(path, role="student")
    if cfg.get("vocab_size") != teacher_cfg.get("vocab_size"):
        raise ValueError(f"teacher/student vocab mismatch: {teacher_cfg.get('vocab_size')} vs {cfg.get('vocab_size')} "
                         f"({path}); distil between models sharing a tokenizer")
    saved = cfg.get(CONFIG_KEY)
    saved = None if saved is None else routing_from_config(saved, where=f"student {path} config.json").to_config()
    if saved is not None and saved != routing.to_config():
        raise ValueError(f"student {path} was trained with routing {saved}, but this run asks for "
                         f"{routing.to_config()}; use the same routing config (or start from the original teacher)")
    return cfg


@dataclass(frozen=True)
class ModelSpec:
    """What to build: the teacher directory, the student's source (default: the teacher), the routing injected
    into a fresh student, the trainable preset, how the teacher is held, and activation checkpointing."""

    teacher: str
    student: str | None
    routing: RoutingVariant
    trainable: Trainable = "full"
    teacher_mode: TeacherMode = "separate"
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        """Argument checks, before any file is read."""
        if self.trainable not in Trainable.__args__:
            raise ValueError(f"trainable must be one of {Trainable.__args__}, got {self.trainable!r}")
        if self.teacher_mode not in TeacherMode.__args__:
            raise ValueError(f"teacher_mode must be one of {TeacherMode.__args__}, got {self.teacher_mode!r}")
        if self.teacher_mode == "shared_weights":
            if self.trainable != "router_only" or not supports(self.routing, MASKABLE):
                raise ValueError(
                    "teacher_mode='shared_weights' needs trainable='router_only' and a maskable routing (zero "
                    "experts: the teacher is the student with them masked, so only router rows may change); use "
                    "teacher_mode='separate'")
            if self.student is not None:
                raise ValueError("teacher_mode='shared_weights' derives the teacher from the student's own weights; "
                                 "it cannot start from a separate student checkpoint (use teacher_mode='separate')")

    @property
    def source(self) -> str:
        return self.student or self.teacher


class Models(NamedTuple):
    student: nn.Module
    #: ``None`` with ``teacher_mode='shared_weights'``: the teacher is the student with zero experts masked
    teacher: FrozenTeacher | None


def set_trainable(model: nn.Module, preset: Trainable) -> None:
    """``full``: every weight; ``router_only``: the injected routers; ``router_and_experts``: routers and the
    routed experts (attention, embeddings and shared experts frozen)."""
    if preset == "full":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    for router in iter_routers(model):
        router.requires_grad_(True)
    if preset == "router_and_experts":
        for _, block in adapter_for(model).find_blocks(model):
            block.experts.requires_grad_(True)


def freeze_original_rows(student: nn.Module) -> None:
    """Shared-weights teacher: each maskable router keeps a copy of its original rows for the masked path."""
    for router in iter_routers(student):
        if supports(router, MASKABLE):
            router.freeze_original_rows()


def build_local(spec: ModelSpec) -> Models:
    """One full copy of each model per process (single device, DDP; also rank 0 of FSDP1)."""
    student = from_pretrained(spec.source, dtype=torch.float32)
    if not any(isinstance(m, BaseRouter) for m in student.modules()):
        inject(student, spec.routing)
    student.train()
    set_trainable(student, spec.trainable)
    if spec.activation_checkpointing:
        enable_activation_checkpointing(student)
    if spec.teacher_mode == "shared_weights":
        freeze_original_rows(student)
        return Models(student, None)
    return Models(student, FrozenTeacher(from_pretrained(spec.teacher, dtype=torch.float32)))


def build_fsdp2(spec: ModelSpec, mesh, storage: torch.dtype = torch.float32, compute: torch.dtype | None = None) -> Models:
    """Student and teacher built on the meta device, sharded per decoder layer over ``mesh`` (FSDP2), filled shard
    by shard from their safetensors; with bf16 compute the frozen teacher is stored in bf16 (no master weights)."""
    student = load_sharded(
        spec.source, mesh, routing=spec.routing, dtype=storage, compute_dtype=compute,
        activation_checkpointing=spec.activation_checkpointing,
        configure=lambda model: set_trainable(model, spec.trainable),
    ).train()
    if spec.teacher_mode == "shared_weights":
        with gathered(student):
            freeze_original_rows(student)
        return Models(student, None)
    teacher = load_sharded(spec.teacher, mesh, dtype=compute or storage, compute_dtype=compute)
    return Models(student, FrozenTeacher(teacher))


def build_fsdp1(spec: ModelSpec, rank_zero: bool) -> Models:
    """FSDPStrategy (FSDP1): rank 0 reads the weights into host memory once, the other ranks build on the meta
    device; each decoder layer and then each model is wrapped with the strategy's settings (call inside its
    ``configure_model``) and FSDP broadcasts rank 0's values (``sync_module_states``)."""
    if rank_zero:
        student, frozen = build_local(spec)
        teacher = frozen.model if frozen is not None else None
    else:
        reader = SafetensorsReader(spec.source)
        fresh = not read_config(spec.source).get(CONFIG_KEY)
        student = build_empty(spec.source, routing=spec.routing if fresh else None, reader=reader).train()
        set_trainable(student, spec.trainable)
        if spec.activation_checkpointing:
            enable_activation_checkpointing(student)
        teacher = None if spec.teacher_mode == "shared_weights" else build_empty(spec.teacher)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def materialise(module: nn.Module) -> None:  # meta ranks: storage only, the values come from rank 0
        module.to_empty(device=device, recurse=False)

    def wrap_model(model: nn.Module) -> nn.Module:
        layers = decoder_layers(model)
        for i in range(len(layers)):
            layers[i] = wrap(layers[i], sync_module_states=True, param_init_fn=materialise)
        return wrap(model, sync_module_states=True, param_init_fn=materialise)

    student = wrap_model(student)
    if teacher is None:
        return Models(student, None)
    teacher.requires_grad_(False)
    return Models(student, FrozenTeacher(wrap_model(teacher)))


def build_for(spec: ModelSpec, trainer=None) -> Models:
    """The builder the trainer's strategy calls for: FSDP2 (``ModelParallelStrategy``), FSDP1, or local."""
    kind = strategy_kind(trainer) if trainer is not None else None
    if kind == "fsdp2":
        return build_fsdp2(spec, trainer.strategy.device_mesh["data_parallel"], *param_dtypes(trainer))
    if kind == "fsdp1":
        return build_fsdp1(spec, trainer.global_rank == 0)
    return build_local(spec)


def meta_student(spec: ModelSpec) -> nn.Module:
    """The configured student on the meta device (shapes and names only, no weights read)."""
    model = build_empty(spec.source)
    if not any(isinstance(m, BaseRouter) for m in model.modules()):
        inject(model, spec.routing, init=False)
    return model
