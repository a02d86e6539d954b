"""ZedaDistillModule through the CLI entry point, in-process: training, metrics, checkpoints, export, bad input."""

from __future__ import annotations

import contextlib
import glob
import io
import os

import pytest
import torch
import yaml

from tests.conftest import write_jsonl
from zeda_lightning.cli import cli_main
from zeda_lightning.export import from_pretrained
from zeda_lightning.modules import ZedaDistillModule


def make_config(tmp_path, teacher, data, *, steps=12, objective="sft", lr=0.01, model_class="zeda_lightning.modules.ZedaDistillModule", **model_args):
    root = tmp_path / "run"
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": steps, "val_check_interval": steps,
            "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root), "name": "logs"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / "ckpt"), "save_last": True}}],
        },
        "model": {
            "class_path": model_class,
            "init_args": {
                "teacher": teacher, "objective": objective,
                "routing": {"class_path": "zeda_lightning.routing.ZeroExperts", "init_args": {"seed": 0}},
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr, "weight_decay": 0.0}},
                "lr_schedule": "constant", "warmup_ratio": 0.0,
                "export_dir": str(root / "student"),
                **model_args,
            },
        },
        "data": {
            "class_path": "zeda_lightning.data.module.ZedaDataModule",
            "init_args": {"tokenizer": teacher, "train_files": data["train"], "val_files": data["val"],
                          "max_length": 32, "batch_size": 8},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), root


def read_metrics(root):
    import csv

    (path,) = glob.glob(str(root / "logs" / "version_*" / "metrics.csv"))
    with open(path) as f:
        return list(csv.DictReader(f))


def series(rows, key):
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_teacher, tiny_data):
    tmp = tmp_path_factory.mktemp("fit")
    teacher_state = {k: v.clone() for k, v in from_pretrained(tiny_teacher).state_dict().items()}
    config, root = make_config(tmp, tiny_teacher, tiny_data, steps=16)
    cli = cli_main(["fit", "--config", config])
    return cli, root, config, teacher_state


def test_fit_loss_decreases_and_zero_ratio_moves_to_target(fitted):
    _, root, _, _ = fitted
    rows = read_metrics(root)
    loss = series(rows, "train/loss")
    zero = series(rows, "train/zero_ratio")
    assert len(loss) == 16
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3
    assert abs(zero[-1] - 0.5) < abs(zero[0] - 0.5)
    names = set(rows[0])
    for name in ["train/loss", "train/aux_loss", "val/zero_ratio", "val/zero_ratio/layer_0", "val/zero_ratio/layer_1",
                 "val/real_experts_per_token", "val/nll", "val/teacher_nll", "val/kl_to_teacher", "val/top1_agreement",
                 "val/zero_ratio/code", "val/zero_ratio/prose", "val/zero_ratio/math"]:
        assert name in names, name
    (v,) = [r for r in rows if r.get("val/zero_ratio")]
    # real experts per token and zero ratio are two views of the same counts: K (1 - zero ratio)
    assert abs(float(v["val/real_experts_per_token"]) - 2 * (1 - float(v["val/zero_ratio"]))) < 1e-5


def test_teacher_frozen_and_unchanged(fitted):
    cli, _, _, teacher_state = fitted
    teacher = cli.model.teacher
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    assert any(p.requires_grad for p in cli.model.student.parameters())


def test_checkpoint_and_export_reload_identical_logits(fitted):
    cli, root, _, _ = fitted
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    student = cli.model.student.eval()
    with torch.no_grad():
        ref = student(ids).logits
    ckpt = torch.load(root / "ckpt" / "last.ckpt", weights_only=False, map_location="cpu")
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])  # the frozen teacher is not duplicated
    reloaded = ZedaDistillModule.load_from_checkpoint(root / "ckpt" / "last.ckpt", map_location="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded.student.eval()(ids).logits, ref)
        assert torch.equal(from_pretrained(str(root / "student"))(ids).logits, ref)


def test_print_config_round_trips(fitted, tmp_path):
    _, _, config, _ = fitted
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(["fit", "--config", config, "--print_config"])
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["init_args"]["routing"]["class_path"] == "zeda_lightning.routing.ZeroExperts"
    printed["trainer"]["max_steps"] = 2
    printed["trainer"]["val_check_interval"] = 2
    printed["trainer"]["default_root_dir"] = str(tmp_path / "again")
    printed["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "again")
    printed["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "again" / "ckpt")
    printed["model"]["init_args"]["export_dir"] = None
    path = tmp_path / "printed.yaml"
    path.write_text(yaml.safe_dump(printed))
    cli = cli_main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 2


class CountingDistill(ZedaDistillModule):
    """Research-code subclass: overrides the distillation loss (adds a logit-norm penalty) and counts calls."""

    calls = 0

    def distill_loss(self, student_logits, teacher_logits, labels):
        type(self).calls += 1
        return super().distill_loss(student_logits, teacher_logits, labels) + 0.0 * student_logits.float().pow(2).mean()


def test_subclass_override_is_used(tmp_path, tiny_teacher, tiny_data):
    config, _ = make_config(tmp_path, tiny_teacher, tiny_data, steps=3, model_class="tests.modules.test_distill.CountingDistill")
    CountingDistill.calls = 0
    cli = cli_main(["fit", "--config", config])
    assert type(cli.model) is CountingDistill
    assert CountingDistill.calls >= 3


def test_shared_weights_teacher_is_the_masked_student(tmp_path, tiny_teacher, tiny_data):
    config, _ = make_config(tmp_path, tiny_teacher, tiny_data, steps=3, objective="forward_kl",
                            trainable="router_only", teacher_mode="shared_weights")
    cli = cli_main(["fit", "--config", config])
    module = cli.model
    assert module.teacher is None
    trainable = {n for n, p in module.student.named_parameters() if p.requires_grad}
    assert trainable and all(".gate." in n for n in trainable)
    ids = torch.randint(0, 300, (2, 12))
    original = from_pretrained(tiny_teacher)
    with torch.no_grad():
        t = module.teacher_forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        assert torch.equal(t, original(ids).logits)


# --- bad input: clear error before anything is written ------------------------------------------------------------


def _assert_fails_clean(args, match, root):
    with pytest.raises((ValueError, SystemExit)) as err:
        cli_main(args)
    if err.type is ValueError:
        assert err.match(match)
    assert not os.path.exists(root), "nothing may be written on bad input"


def test_missing_teacher_path(tmp_path, tiny_data):
    config, root = make_config(tmp_path, str(tmp_path / "nope"), tiny_data)
    with pytest.raises(ValueError, match="model directory not found"):
        cli_main(["fit", "--config", config])
    assert not os.path.exists(root)


def test_teacher_without_moe_layer(tmp_path, tiny_teacher, tiny_data):
    from zeda_lightning.tiny import tiny_model

    dense = tmp_path / "dense"
    tiny_model("qwen3_moe", vocab_size=300, mlp_only_layers=[0, 1]).save_pretrained(dense)
    config, root = make_config(tmp_path, str(dense), tiny_data)
    with pytest.raises(ValueError, match="has no MoE layer"):
        cli_main(["fit", "--config", config])
    assert not os.path.exists(root)


def test_empty_dataset_and_missing_field(tmp_path, tiny_teacher, tiny_data):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config, root = make_config(tmp_path, tiny_teacher, {"train": str(empty), "val": tiny_data["val"]})
    with pytest.raises(ValueError, match="empty.jsonl"):
        cli_main(["fit", "--config", config])
    assert not os.path.exists(root)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok", "domain": "code"}, {"text": "", "domain": "code"}])
    config, root = make_config(tmp_path, tiny_teacher, {"train": bad, "val": tiny_data["val"]})
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: missing or empty field 'text'"):
        cli_main(["fit", "--config", config])
    assert not os.path.exists(root)
    nofield = write_jsonl(tmp_path / "nofield.jsonl", [{"body": "x"}])
    config, root = make_config(tmp_path, tiny_teacher, {"train": nofield, "val": tiny_data["val"]})
    with pytest.raises(ValueError, match="nofield.jsonl: rows need 'text'"):
        cli_main(["fit", "--config", config])


def test_vocab_mismatch(tmp_path, tiny_teacher, tiny_data):
    from zeda_lightning.tiny import tiny_model

    other = tmp_path / "other"
    tiny_model("qwen3_moe", vocab_size=128).save_pretrained(other)
    config, root = make_config(tmp_path, tiny_teacher, tiny_data, student=str(other))
    with pytest.raises(ValueError, match="vocab mismatch"):
        cli_main(["fit", "--config", config])
    config, root = make_config(tmp_path, str(other), {**tiny_data})
    # the data's tokenizer (300 tokens) is larger than this teacher's vocabulary (128)
    cfg = yaml.safe_load(open(config))
    cfg["data"]["init_args"]["tokenizer"] = tiny_teacher
    open(config, "w").write(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="has 300 tokens but teacher"):
        cli_main(["fit", "--config", config])
    assert not os.path.exists(root)


def test_unknown_class_path(tmp_path, tiny_teacher, tiny_data, capsys):
    config, root = make_config(tmp_path, tiny_teacher, tiny_data)
    cfg = yaml.safe_load(open(config))
    cfg["model"]["init_args"]["routing"]["class_path"] = "zeda_lightning.routing.NoSuchRouter"
    open(config, "w").write(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", config])
    assert "NoSuchRouter" in capsys.readouterr().err
    assert not os.path.exists(root)


def test_shared_weights_needs_router_only(tiny_teacher):
    with pytest.raises(ValueError, match="shared_weights' needs trainable='router_only'"):
        ZedaDistillModule(teacher=tiny_teacher, teacher_mode="shared_weights", trainable="full")


def test_a_checkpoint_from_before_the_budget_buffer_resumes(tmp_path, tiny_teacher, tiny_data):
    """Checkpoints written before the compute budget became a router buffer lack ``*.zero_logit_bias``: they
    resume, the bias starting at 0 (the value it always had in training)."""
    config, root = make_config(tmp_path, tiny_teacher, tiny_data, steps=2, objective="forward_kl")
    cli_main(["fit", "--config", config])
    ckpt = torch.load(root / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    dropped = [k for k in ckpt["state_dict"] if k.endswith(".zero_logit_bias")]
    assert dropped
    for key in dropped:
        del ckpt["state_dict"][key]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    cli = cli_main(["fit", "--config", config, "--trainer.max_steps", "4", "--model.init_args.export_overwrite", "true",
                    "--ckpt_path", str(old)])
    assert cli.trainer.global_step == 4
    assert all(float(r.zero_logit_bias) == 0.0 for r in cli.model.student.modules() if hasattr(r, "zero_logit_bias"))
