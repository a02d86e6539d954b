"""The distillation core from a user's side: objectives and router losses chosen in YAML by ``class_path`` (the old
shorthands still run), variants judged by the capabilities they declare, the teacher outside the module tree, one
forward pair used by both stages, the renamed temperatures, the batch size however the run is launched, and the
LongCat controller stepping once per optimiser step with counts summed over processes."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml

from tests.modules.test_distill import make_config, read_metrics
from tests.modules.test_opd import opd_config
from zeda_lightning.cli import cli_main
from zeda_lightning.data.module import ZedaDataModule
from zeda_lightning.losses.kd import forward_kl
from zeda_lightning.losses.objectives import Objective
from zeda_lightning.losses.router_losses import GroupBalance, RouterLoss
from zeda_lightning.modules.distill import ZedaDistillModule
from zeda_lightning.modules.opd import OnPolicyDistillModule
from zeda_lightning.routing.base import MASKABLE, ZERO_SLOTS, RoutingVariant, register_routing
from zeda_lightning.routing.top_p import TopP
from zeda_lightning.routing.zero_experts import ZeroExpertRouter


class HalfForwardKL(Objective):
    """A research objective named in YAML: half the forward KL (so its value is checkable by hand)."""

    def __init__(self, scale: float = 0.5) -> None:
        self.scale = scale

    def loss(self, student_logits, teacher_logits, labels):
        return self.scale * forward_kl(student_logits, teacher_logits, labels != -100)


class ConstantRouterLoss(RouterLoss):
    def __init__(self, value: float = 0.25) -> None:
        self.value = value

    def __call__(self, records, token_mask):
        return records[0].router_logits.new_full((), self.value, dtype=torch.float32)


@register_routing("test_declared_zero_slots")
class DeclaredZeroSlots(RoutingVariant):
    """A research variant that is not a ``ZeroExperts`` subclass but declares what it supports."""

    capabilities = frozenset({MASKABLE, ZERO_SLOTS})

    def __init__(self, seed: int | None = 0) -> None:
        self.seed = seed

    def make_router(self, dims, scoring, **kw):
        return ZeroExpertRouter(dims, scoring, dims.num_experts // 2, False, **kw)


def _batch(n=2, s=12, vocab=300):
    ids = torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_objective_and_router_loss_by_class_path(tmp_path, tiny_teacher, tiny_data):
    config, root = make_config(tmp_path, tiny_teacher, tiny_data, steps=2,
                               objective={"class_path": "tests.modules.test_components.HalfForwardKL",
                                          "init_args": {"scale": 0.5}},
                               aux_loss={"class_path": "tests.modules.test_components.ConstantRouterLoss",
                                         "init_args": {"value": 0.25}})
    cli = cli_main(["fit", "--config", config])
    module = cli.model
    assert isinstance(module.objective, HalfForwardKL) and isinstance(module.router_loss, ConstantRouterLoss)
    rows = [r for r in read_metrics(root) if r.get("train/aux_loss")]
    assert rows and all(abs(float(r["train/aux_loss"]) - 0.25) < 1e-6 for r in rows)
    batch = _batch()
    s, _ = module.student_forward(batch)
    t = module.teacher_forward(batch)
    expected = 0.5 * forward_kl(s[:, :-1], t[:, :-1], batch["labels"][:, 1:] != -100)
    assert torch.allclose(module.distill_loss(s, t, batch["labels"]), expected)
    # the shorthand and its component give the same loss
    short = ZedaDistillModule(teacher=tiny_teacher, objective="forward_kl", kl_temperature=2.0)
    assert short.objective.temperature == 2.0
    assert torch.allclose(short.distill_loss(s, t, batch["labels"]),
                          forward_kl(s[:, :-1], t[:, :-1], batch["labels"][:, 1:] != -100, 2.0))


def test_capabilities_not_classes_decide(tiny_teacher):
    with pytest.raises(ValueError, match="needs a routing with 'zero_slots'.*TopP"):
        ZedaDistillModule(teacher=tiny_teacher, routing=TopP(p=0.5), aux_loss="group")
    with pytest.raises(ValueError, match="maskable routing"):
        ZedaDistillModule(teacher=tiny_teacher, routing=TopP(p=0.5), aux_loss="none", trainable="router_only",
                          teacher_mode="shared_weights")
    # a variant that only declares the capabilities gets L_GA and the masked shared-weights teacher
    module = ZedaDistillModule(teacher=tiny_teacher, routing=DeclaredZeroSlots(), aux_loss="group",
                               trainable="router_only", teacher_mode="shared_weights", objective="forward_kl")
    assert isinstance(module.router_loss, GroupBalance)
    module.configure_model()
    batch = _batch()
    with torch.no_grad():
        teacher_logits = module.teacher_forward(batch)
        reference = ZedaDistillModule(teacher=tiny_teacher, routing=DeclaredZeroSlots())
        reference.configure_model()
        assert torch.equal(teacher_logits, reference.teacher.model(input_ids=batch["input_ids"]).logits)


def test_teacher_is_outside_the_module_tree(tiny_teacher):
    module = ZedaDistillModule(teacher=tiny_teacher, objective="forward_kl")
    module.configure_model()
    assert not any(name.startswith("teacher") for name, _ in module.named_modules())
    assert not any(key.startswith("teacher") for key in module.state_dict())
    assert all(not p.requires_grad for p in module.teacher.parameters())
    module.train()
    assert not module.teacher.model.training
    module.to(torch.bfloat16)  # what a "bf16-true" precision plugin does to the module: the teacher follows
    module.teacher_forward(_batch())
    assert next(module.teacher.parameters()).dtype == torch.bfloat16


class CountingForwards(OnPolicyDistillModule):
    """Research code overriding the forward pair once: it must reach stage 2's rollouts too."""

    student_calls: list = []
    teacher_calls: int = 0

    def student_forward(self, batch, replay=None):
        type(self).student_calls.append(replay is not None)
        return super().student_forward(batch, replay)

    def teacher_forward(self, batch):
        type(self).teacher_calls += 1
        return super().teacher_forward(batch)


def _fit_opd(tiny_teacher, tiny_data, cls=OnPolicyDistillModule, steps=2, **kwargs):
    L.seed_everything(0, verbose=False)
    module = cls(teacher=tiny_teacher, routing={"class_path": "zeda_lightning.routing.ZeroExperts",
                                               "init_args": {"seed": 0}}, max_new_tokens=4,
                 optimizer=lambda p: torch.optim.SGD(p, lr=0.1), lr_schedule="constant", warmup_ratio=0.0, **kwargs)
    dm = ZedaDataModule(tokenizer=tiny_teacher, train_files=tiny_data["train"], prompts=True, prompt_tokens=8,
                        max_length=32, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    return module, trainer


def test_overrides_reach_stage_two_and_logs_are_synced(tiny_teacher, tiny_data, monkeypatch):
    CountingForwards.student_calls, CountingForwards.teacher_calls = [], 0
    logged = []
    original = L.LightningModule.log

    def spy(self, name, value, *args, **kwargs):
        logged.append((name, kwargs.get("sync_dist", False)))
        return original(self, name, value, *args, **kwargs)

    monkeypatch.setattr(L.LightningModule, "log", spy)
    _fit_opd(tiny_teacher, tiny_data, cls=CountingForwards, steps=2)
    # per step: the sampler's old log-probs and the training forward, both with the replayed routing
    assert CountingForwards.student_calls.count(True) == 4
    assert CountingForwards.teacher_calls == 2
    train = [(n, synced) for n, synced in logged if n.startswith("train/")]
    assert train and all(synced for _, synced in train), [n for n, s in train if not s]


def test_sampling_and_kl_temperatures_are_separate(tiny_teacher, tiny_data):
    module = OnPolicyDistillModule(teacher=tiny_teacher, objective="forward_kl", kl_temperature=2.0,
                                   sampling_temperature=0.5, lmbda=0.0)
    assert module.sampling_temperature == 0.5
    batch = _batch()
    module.configure_model()
    s, _ = module.student_forward(batch)
    t = module.teacher_forward(batch)
    mask = batch["labels"][:, 1:] != -100
    # the off-policy (lmbda < 1) step's KL uses kl_temperature, not the sampling temperature
    assert torch.allclose(module.distill_loss(s, t, batch["labels"]), forward_kl(s[:, :-1], t[:, :-1], mask, 2.0))
    assert not torch.allclose(module.distill_loss(s, t, batch["labels"]), forward_kl(s[:, :-1], t[:, :-1], mask, 0.5))


def test_old_temperature_key_is_refused_naming_the_new_one(tmp_path, tiny_teacher, tiny_data):
    with pytest.raises(ValueError, match="kl_temperature"):
        ZedaDistillModule(teacher=tiny_teacher, temperature=2.0)
    config, _ = opd_config(tmp_path, tiny_teacher, tiny_data, steps=1, temperature=1.0)
    with pytest.raises(Exception) as err:
        cli_main(["fit", "--config", config])
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("sampling_temperature" in m for m in chain), chain


def test_global_batch_size_applies_when_fit_from_python(tiny_teacher, tiny_data):
    L.seed_everything(0, verbose=False)
    module = ZedaDistillModule(teacher=tiny_teacher, objective="forward_kl", global_batch_size=8,
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.01), lr_schedule="constant",
                               warmup_ratio=0.0)
    dm = ZedaDataModule(tokenizer=tiny_teacher, train_files=tiny_data["train"], max_length=32, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.accumulate_grad_batches == 4
    assert trainer.global_step == 2 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 8
