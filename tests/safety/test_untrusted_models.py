"""A downloaded model directory never runs code: names it carries resolve through the package's registry only.

The hostile directory below ships Python files and names them everywhere a name is read: ``zeda_routing.class_path``
(importable from the working directory, as under ``python -m`` or Jupyter), ``auto_map`` in ``config.json`` and
``tokenizer_config.json``, and a ``custom_generate/generate.py``. Each file would create a marker file on import;
every entry point must refuse the directory with one clear line and the marker must never appear.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.helpers import export_zero_expert_student
from tests.safety.runs import ROOT, error_lines, run_cli, write_config

PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('pwned')\nclass ZeroExperts: pass\nclass Cfg: pass\n"


@pytest.fixture()
def hostile(tmp_path, tiny_teacher):
    """``tmp_path/hubmodel``: a zeda export whose config names ``hubmodel.zeda_patch.ZeroExperts``."""
    model = tmp_path / "hubmodel"
    export_zero_expert_student(tiny_teacher, str(model))
    marker = tmp_path / "MARKER"
    for name in ("zeda_patch.py", "configuration_evil.py", "tokenization_evil.py"):
        (model / name).write_text(PAYLOAD.format(marker=str(marker)))
    (model / "custom_generate").mkdir()
    (model / "custom_generate" / "generate.py").write_text(PAYLOAD.format(marker=str(marker)) + "def generate(**k): pass\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["zeda_routing"]["class_path"] = "hubmodel.zeda_patch.ZeroExperts"
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.Cfg", "AutoModelForCausalLM": "configuration_evil.Cfg"}
    (model / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.Cfg", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return model, marker


REFUSAL = "routing class_path 'hubmodel.zeda_patch.ZeroExperts' is not a registered routing variant"


def test_from_pretrained_in_a_notebook_does_not_import_the_model_directory(hostile, monkeypatch):
    from zeda_lightning.export import from_pretrained

    model, marker = hostile
    monkeypatch.chdir(model.parent)
    monkeypatch.syspath_prepend(str(model.parent))  # Jupyter / python -m: the working directory is importable
    with pytest.raises(ValueError, match=REFUSAL):
        from_pretrained("hubmodel")
    assert not marker.exists()
    assert "hubmodel" not in sys.modules and "hubmodel.zeda_patch" not in sys.modules


@pytest.mark.parametrize("command", ["generate", "budget", "eval", "fit"])
def test_cli_refuses_the_hostile_directory_without_running_it(hostile, command, tiny_teacher, tiny_data, tmp_path):
    model, marker = hostile
    if command == "generate":
        args = ["generate", "--model", "hubmodel", "--prompt", "def f(", "--max_new_tokens", "2"]
    elif command == "budget":
        args = ["budget", "--model", "hubmodel", "--target", "0.3", "--calibration", tiny_data["val"], "--block_size", "32",
                "--out", str(tmp_path / "budgeted")]
    elif command == "eval":
        args = ["eval", "--model", "hubmodel", "--tasks", "[zeda_tiny_continuation]",
                "--include_path", os.path.join(ROOT, "tests", "evaluation", "tasks"), "--limit", "2"]
    else:
        config = write_config(tmp_path / "fit.yaml", tmp_path / "run", tiny_teacher, tiny_data,
                              model={"student": "hubmodel"})
        args = ["fit", "--config", config]
    proc = run_cli(*args, cwd=str(model.parent))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert any(REFUSAL in line for line in error_lines(proc)), proc.stderr[-3000:]
    assert not marker.exists(), "code from the model directory ran"
    assert not (tmp_path / "run").exists() and not (tmp_path / "budgeted").exists()


def test_any_importable_module_named_by_a_file_is_not_imported(tmp_path, tiny_teacher):
    """``this`` prints the Zen of Python on import: a class_path naming it must not print anything."""
    model = tmp_path / "m"
    export_zero_expert_student(tiny_teacher, str(model))
    cfg = json.loads((model / "config.json").read_text())
    cfg["zeda_routing"]["class_path"] = "this.ZeroExperts"
    (model / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("generate", "--model", str(model), "--prompt", "x", "--max_new_tokens", "1")
    assert proc.returncode == 2 and "Beautiful is better than ugly" not in proc.stdout + proc.stderr
    assert any("'this.ZeroExperts' is not a registered routing variant" in line for line in error_lines(proc))


@pytest.mark.parametrize("init_args, message", [
    ({"num_zero_experts": 2.5}, "ZeroExperts.num_zero_experts must be int | None, got 2.5"),
    ({"num_zero_experts": "four"}, "ZeroExperts.num_zero_experts must be int | None, got 'four'"),
    ({"seed": 0, "evil": 1}, "ZeroExperts has no argument(s) ['evil']"),
])
def test_routing_init_args_from_a_file_are_type_checked(tmp_path, tiny_teacher, init_args, message):
    from zeda_lightning.export import from_pretrained

    model = tmp_path / "m"
    export_zero_expert_student(tiny_teacher, str(model))
    cfg = json.loads((model / "config.json").read_text())
    cfg["zeda_routing"]["init_args"] = init_args
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        from_pretrained(str(model))
    assert message in str(err.value)


@pytest.mark.parametrize("value", [2.5, "four"])
def test_yaml_routing_init_args_are_type_checked(tmp_path, tiny_teacher, tiny_data, value):
    routing = {"class_path": "zeda_lightning.routing.ZeroExperts", "init_args": {"num_zero_experts": value}}
    config = write_config(tmp_path / "fit.yaml", tmp_path / "run", tiny_teacher, tiny_data, model={"routing": routing})
    proc = run_cli("fit", "--config", config)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert any("num_zero_experts must be int | None" in line for line in error_lines(proc)), proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_registered_research_variant_loads_from_user_code(tmp_path, tiny_teacher):
    """The registry is extendable from user code (never from a file): register, then load."""
    from zeda_lightning import ZeroExperts, inject
    from zeda_lightning.export import export_model, from_pretrained
    from zeda_lightning.routing import ROUTING_VARIANTS, register_routing

    @register_routing("test_my_zero")
    class MyZero(ZeroExperts):
        pass

    try:
        model = inject(from_pretrained(tiny_teacher), MyZero(num_zero_experts=2, seed=0))
        out = export_model(model, str(tmp_path / "mine"))
        assert json.loads(open(os.path.join(out, "config.json")).read())["zeda_routing"]["class_path"].endswith("MyZero")
        assert type(from_pretrained(out).model.layers[0].mlp.gate).__name__ == "ZeroExpertRouter"
    finally:
        ROUTING_VARIANTS.pop("test_my_zero")


@pytest.mark.parametrize("record", [
    {"layers": 5, "zero_logit_bias": [0.0]},
    {"layers": "0123", "zero_logit_bias": [0.0, 0.0, 0.0, 0.0]},
    {"zero_logit_bias": "1e9"},
    {"zero_logit_bias": [float("nan")] * 4},
    ["not", "a", "dict"],
])
def test_a_hostile_budget_record_is_one_clear_error(tmp_path, tiny_teacher, record):
    """``config.json``'s ``zeda_budget`` is a readable record: malformed, it is refused naming the field (no
    traceback from deep inside the loader), on the API and on the command line."""
    from zeda_lightning.export import from_pretrained

    model = tmp_path / "m"
    export_zero_expert_student(tiny_teacher, str(model))
    cfg = json.loads((model / "config.json").read_text())
    cfg["zeda_budget"] = record
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="zeda_budget"):
        from_pretrained(str(model))
    proc = run_cli("generate", "--model", str(model), "--prompt", "x", "--max_new_tokens", "1")
    assert proc.returncode == 2 and any("zeda_budget" in line for line in error_lines(proc)), proc.stderr[-2000:]


def test_a_loadable_directory_with_auto_map_and_custom_generate_runs_none_of_it(hostile, monkeypatch):
    """With a valid routing record the loaders read everything else: ``auto_map`` (config and tokenizer) and
    ``custom_generate/`` are never followed, in the API (working directory importable) and on the command line."""
    from zeda_lightning.export import from_pretrained
    from zeda_lightning.sampling import generate_text

    model, marker = hostile
    cfg = json.loads((model / "config.json").read_text())
    cfg["zeda_routing"]["class_path"] = "zeda_lightning.routing.ZeroExperts"
    (model / "config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(model.parent)
    monkeypatch.syspath_prepend(str(model.parent))
    assert type(from_pretrained("hubmodel")).__name__ == "Qwen3MoeForCausalLM"
    assert isinstance(generate_text("hubmodel", "def f(", max_new_tokens=2), str)
    proc = run_cli("generate", "--model", "hubmodel", "--prompt", "def f(", "--max_new_tokens", "2",
                   cwd=str(model.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists(), "code from the model directory ran"
    assert not any(m.startswith(("configuration_evil", "tokenization_evil", "hubmodel")) for m in sys.modules)
