"""``python -m zeda_lightning estimate --config YAML``: parameters, trainable parameters and memory per GPU of a
distillation config, for each trainable preset and each strategy, from the model's ``config.json`` alone.

The config is the one ``fit`` would run: read by fit's parser (the classes' signatures give the defaults, flags such
as ``--data.init_args.batch_size 4`` override the YAML), never instantiated. The student and the teacher are built on the meta device (no weight is allocated or read), the YAML's routing is
injected, and the memory per GPU is counted from the tensors' shapes:

    student parameters  P_s x storage bytes / W         (fp32 masters under bf16-mixed; bf16 under bf16-true)
    gradients           trainable x storage bytes / W  (FSDP2: per parameter; FSDP1: every flat parameter that
                                                        holds a trainable one, frozen parts included)
    optimiser (AdamW)   2 x trainable x storage bytes / W  (its moments take the parameters' dtype)
    teacher             P_t x compute bytes / W         (frozen: stored in the compute dtype, no grads, no state)
    gathered            3 x the largest FSDP unit in the compute dtype (a decoder layer, or the embeddings or the
                        head, each its own unit): the unit in use plus the next one's all-gather buffer and copied-out
                        parameters (measured on the Qwen3-30B-A3B slice: +3.5 GB per process over 1.2 GB units)
    logits              B x S x V x 4 bytes x 3          (student logits, their gradient, teacher logits; fp32;
                                                        on-policy: B = prompts x num_samples, S = prompt + response)
    layer inputs        L x B x S x H x compute bytes    (kept for the recompute, with activation checkpointing)
    rollout gathered    on-policy under FSDP2 (``rollout_gather`` not ``per_layer``): the whole student gathered for
                        sampling, (P_s + the largest unit) x compute bytes: FSDP2 copies every unit out of its
                        all-gather buffer into new full-size parameters beside the local shards (the shards are
                        not reused), and the last unit's buffer is alive while it is copied out; the peak counts
                        the larger of it and the step's transients (gathered units, logits, activations)
    activations         B x S x a x compute bytes x (L + 1), or x 2 with activation checkpointing: what one layer
                        keeps for backward (``activation_values_per_token``: a per token) for every layer, or for
                        the one being recomputed, plus its gradients

W = devices x num_nodes (``ddp`` keeps a full copy per GPU). Not counted: the process's fixed part (interpreter,
libraries, communication buffers; ~0.5 GB per process on CPU) and allocator slack.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from transformers import AutoConfig

from zeda_lightning.adapters import CONFIG_KEY, adapter_for, inject
from zeda_lightning.routing import BaseRouter, ZeroExperts, routing_from_config
from zeda_lightning.sharding import build_empty, fsdp_units

PRESETS = ("full", "router_only", "router_and_experts")
STRATEGIES = ("fsdp2", "fsdp1", "ddp")
GIB = 1024**3


@dataclass
class Estimate:
    preset: str
    strategy: str
    world_size: int
    params: int
    trainable: int
    teacher_params: int
    gib_per_gpu: float
    breakdown_gib: dict


def _trainable_names(model: nn.Module, preset: str) -> set[str]:
    if preset == "full":
        return {n for n, _ in model.named_parameters()}
    names = {n for n, m in model.named_modules() if isinstance(m, BaseRouter)}
    if preset == "router_and_experts":
        names |= {f"{n}.experts" for n, _ in adapter_for(model).find_blocks(model)}
    return {p for p, _ in model.named_parameters() if any(p.startswith(m + ".") for m in names)}


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _units(model: nn.Module) -> list[list[str]]:
    """Parameter names per FSDP2 unit, as ``sharding.shard`` makes them (``fsdp_units``): a parameter belongs to
    the innermost unit that holds it, the root keeps the rest."""
    *inner, _root = fsdp_units(model)
    names = {id(m): n for n, m in model.named_modules()}
    units = [[p for p, _ in model.named_parameters() if p.startswith(names[id(m)] + ".")] for m in inner]
    inside = {p for u in units for p in u}
    return units + [[p for p, _ in model.named_parameters() if p not in inside]]


def activation_values_per_token(cfg, pool: int | None = None) -> int:
    """Activation values one MoE decoder layer keeps per token for its backward (compute dtype), as autograd saves
    them in transformers' layers (checked against saved-tensor hooks in the tests):

        5 H                 norm outputs, projection inputs, the residual
        4 (q + kv)          q and k / v projections, their norms and rotations (q = heads x head_dim, kv = kv
                            heads x head_dim), the attention output (fused attention keeps no S x S scores)
        2 pool              the router's probabilities over real + zero experts (fp32: 2 compute-dtype values)
        K (H + 5 I)         per routed slot: the gathered input, gate / up output (2 I), SiLU input, product and
                            the down projection's input; every slot counted (zero slots are not known in advance,
                            so this is an upper bound)
        H + 4 I_shared      a shared expert's MLP
    """
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or (
        (getattr(cfg, "qk_nope_head_dim", 0) + getattr(cfg, "qk_rope_head_dim", 0)) or hidden // heads)
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    top_k = getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "top_k", None) or 1
    experts = (getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None)
               or getattr(cfg, "num_local_experts", None) or 0)
    shared = (getattr(cfg, "n_shared_experts", None) or 0) * inter + (getattr(cfg, "shared_expert_intermediate_size", None) or 0)
    attention = 4 * heads * head_dim + 4 * kv_heads * head_dim + 2 * head_dim
    router = 2 * (pool or experts)
    return 5 * hidden + attention + router + top_k * (hidden + 5 * inter) + (hidden + 4 * shared if shared else 0)


def estimate(model_dir: str, routing, *, devices: int, num_nodes: int, precision: str, batch_size: int,
             seq_len: int, activation_checkpointing: bool, teacher_mode: str = "separate",
             presets=PRESETS, strategies=STRATEGIES, rollout_gather: bool = False) -> list[Estimate]:
    """Memory per GPU for each preset and strategy (see the module docstring); ``rollout_gather``: on-policy
    sampling gathers the whole FSDP2 student once per rollout, so the peak is the larger of that and a step's
    transients."""
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    if hasattr(config, CONFIG_KEY):  # a zeda export (e.g. the stage-1 student of an OPD config): its teacher's shapes
        delattr(config, CONFIG_KEY)
    teacher = build_empty(config)
    teacher_params = _numel(teacher) if teacher_mode == "separate" else 0
    teacher_sizes = dict((n, p.numel()) for n, p in teacher.named_parameters())
    teacher_unit = max(sum(teacher_sizes[n] for n in u) for u in _units(teacher))
    student = build_empty(model_dir)  # an export comes back with its own routers
    if not any(isinstance(m, BaseRouter) for m in student.modules()):
        inject(student, routing, init=False)
    params = _numel(student)
    sizes = dict((n, p.numel()) for n, p in student.named_parameters())
    storage = 2 if precision == "bf16-true" else 4
    compute = 2 if precision.startswith("bf16") else 4
    cfg = student.config
    units = _units(student)
    largest_unit = max(max(sum(sizes[n] for n in u) for u in units), teacher_unit if teacher_params else 0)
    tokens = batch_size * seq_len
    logits = tokens * cfg.vocab_size * 4 * 3
    pool = max((r.weight.shape[0] for r in student.modules() if isinstance(r, BaseRouter)), default=None)
    layer_acts = tokens * activation_values_per_token(cfg, pool) * compute
    inputs = cfg.num_hidden_layers * tokens * cfg.hidden_size * compute if activation_checkpointing else 0
    # kept for backward: with checkpointing one layer's recompute at a time, else every layer; plus one layer's
    # gradients of them while it runs backward
    activations = (1 if activation_checkpointing else cfg.num_hidden_layers) * layer_acts + layer_acts
    out = []
    for preset in presets:
        trainable_names = _trainable_names(student, preset)
        trainable = sum(sizes[n] for n in trainable_names)
        for strategy in strategies:
            world = devices * num_nodes
            shards = 1 if strategy == "ddp" else world
            if strategy == "fsdp1":
                grad_numel = sum(sum(sizes[n] for n in u) for u in units if trainable_names.intersection(u))
            else:
                grad_numel = trainable
            parts = {
                "student": params * storage / shards,
                "grads": grad_numel * storage / shards,
                "optimizer": 2 * trainable * storage / shards,  # AdamW moments in the parameters' dtype
                "teacher": teacher_params * compute / shards,
                # FSDP: one unit in use while the next is gathered (its all-gather buffer and its copied-out
                # parameters at once), so three of the largest unit's size at the peak
                "gathered": 0 if strategy == "ddp" else 3 * largest_unit * compute,
                "logits": logits,
                "layer_inputs": inputs,
                "activations": activations,
            }
            total = sum(parts.values())
            if rollout_gather and strategy == "fsdp2":
                # sampling holds the whole student gathered (rollout_gather: once) instead of the step's transients
                parts["rollout_gathered"] = (params + largest_unit) * compute
                transients = sum(parts[k] for k in ("gathered", "logits", "layer_inputs", "activations"))
                total += max(0.0, parts["rollout_gathered"] - transients)
            out.append(Estimate(preset, strategy, world, params, trainable, teacher_params,
                                round(total / GIB, 2), {k: round(v / GIB, 3) for k, v in parts.items()}))
    return out


def _model_dir(cfg: dict, config_path: str | None, given: str | None) -> str:
    """The directory whose ``config.json`` describes the model: ``--model_dir``, else the YAML's student/teacher if
    it holds a config.json, else ``assets/configs/<the YAML's folder name>`` (the shipped real-model configs)."""
    if given:
        return given
    args = cfg["model"]["init_args"]
    for key in ("student", "teacher"):
        d = args.get(key)
        if d and os.path.isfile(os.path.join(d, "config.json")):
            return d
    looked = f"model.init_args.teacher ({args.get('teacher')})"
    if config_path is not None:
        shipped = os.path.join("assets", "configs", os.path.basename(os.path.dirname(os.path.abspath(config_path))))
        if os.path.isfile(os.path.join(shipped, "config.json")):
            return shipped
        looked += f" nor at {shipped}"
    raise ValueError(f"{config_path or 'the config'}: no config.json at {looked}; pass --model_dir DIR (any directory "
                     "with the model's config.json)")


def _device_count(devices) -> int:
    """GPUs per node from ``trainer.devices`` as Lightning reads it: a count (``8``, ``"8"``) or device indices
    (``[0, 1]``, ``"0,1"``); ``"auto"`` and ``-1`` depend on the machine, so they are refused."""
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    elif isinstance(devices, str) and "," in devices:
        devices = [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, (list, tuple)) and devices:
        return len(devices)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return devices
    raise ValueError(f"estimate: trainer.devices is {devices!r}, not a count of GPUs; pass --devices N (GPUs per node) "
                     "or set trainer.devices")


def _routing(args: dict):
    r = args.get("routing")
    return ZeroExperts() if r is None else routing_from_config(r)


def _table(rows: list[Estimate]) -> str:
    head = f"{'preset':<20}{'strategy':<9}{'GPUs':>5}{'params':>10}{'trainable':>11}{'GiB/GPU':>9}  breakdown (GiB)"
    lines = [head, "-" * len(head)]
    for r in rows:
        parts = " ".join(f"{k}={v:g}" for k, v in r.breakdown_gib.items() if v)
        lines.append(f"{r.preset:<20}{r.strategy:<9}{r.world_size:>5}{r.params / 1e9:>9.2f}B{r.trainable / 1e9:>10.3f}B"
                     f"{r.gib_per_gpu:>9.1f}  {parts}")
    return "\n".join(lines)


def estimate_main(config: dict[str, Any], model_dir: str | None = None, devices: int | None = None,
                  num_nodes: int | None = None) -> dict:
    """Parameters, trainable parameters and GiB per GPU of a distillation config, per preset and strategy.

    Prints a table; returns the estimates. Nothing is instantiated and no weight is read: the model is built on the
    meta device from its ``config.json``.

    Args:
        config: the config ``fit`` would run, resolved by fit's parser and not instantiated (``--config YAML`` and
            overrides such as ``--data.init_args.batch_size 4``; ``config["config"]`` lists the YAML files).
        model_dir: directory with the model's config.json (default: the YAML's student or teacher if it holds one,
            else assets/configs/<the YAML's folder name>).
        devices: GPUs per node (default: trainer.devices).
        num_nodes: nodes (default: trainer.num_nodes).
    """
    files = [str(path) for path in config.get("config") or []]
    source = files[0] if files else None
    trainer, model_args, data_args = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    devices = devices or _device_count(trainer["devices"])
    num_nodes = num_nodes or trainer["num_nodes"]
    model_dir = _model_dir(config, source, model_dir)
    precision = str(trainer["precision"] or "32-true")
    batch, seq = data_args["batch_size"], data_args["max_length"]
    on_policy = "num_samples" in model_args or "max_new_tokens" in model_args
    if on_policy:  # rollouts of prompt + response
        batch *= model_args.get("num_samples", 1)
        seq += model_args.get("max_new_tokens", 0)
    with torch.device("cpu"):
        rows = estimate(
            model_dir, _routing(model_args), devices=devices, num_nodes=num_nodes, precision=precision,
            batch_size=batch, seq_len=seq, activation_checkpointing=model_args.get("activation_checkpointing", False),
            teacher_mode=model_args.get("teacher_mode", "separate"),
            rollout_gather=on_policy and model_args.get("rollout_gather", "auto") != "per_layer",
        )
    print(f"{source or 'config'}: model {model_dir}, precision {precision}, {batch} sequences x {seq} tokens per GPU")
    print(_table(rows))
    return {"config": source, "model_dir": model_dir, "batch_size": batch, "seq_len": seq,
            "estimates": [asdict(r) for r in rows]}


__all__ = ["Estimate", "estimate", "estimate_main"]
