"""Export and reload: bit-identical round trip for every family (budget included), atomic writes, refusals."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from zeda_lightning import ZeroExperts, inject
from zeda_lightning.budget import BUDGET_KEY, set_zero_logit_bias, zero_logit_biases
from zeda_lightning.export import check_model_dir, export_model, from_pretrained
from zeda_lightning.routing import iter_routers
from zeda_lightning.tiny import FAMILIES, tiny_model
from tests.helpers import single_thread  # noqa: F401  (autouse: one intra-op thread)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_gives_bit_identical_logits_with_routers_and_budget(tmp_path, family):
    model = inject(tiny_model(family), ZeroExperts(seed=0))
    n_layers = len(list(iter_routers(model)))
    set_zero_logit_bias(model, [0.5 + 0.25 * i for i in range(n_layers)], {"target": 0.6})
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    export_model(model, str(tmp_path / "m"))
    loaded = from_pretrained(str(tmp_path / "m"))
    assert type(loaded) is type(model)
    assert zero_logit_biases(loaded) == [0.5 + 0.25 * i for i in range(n_layers)]
    assert json.loads((tmp_path / "m" / "config.json").read_text())[BUDGET_KEY]["target"] == 0.6
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    # and the loaded routers are really used: without the bias the logits differ
    set_zero_logit_bias(loaded, 0.0)
    with torch.no_grad():
        assert not torch.equal(loaded(ids).logits, ref)


def test_biases_set_on_routers_directly_are_exported_too(tmp_path):
    model = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=0))
    for r in iter_routers(model):
        r.zero_logit_bias = 1.5
    export_model(model, str(tmp_path / "m"))
    assert zero_logit_biases(from_pretrained(str(tmp_path / "m"))) == [1.5, 1.5]


def test_the_budget_is_a_buffer_in_the_weights_and_config_json_only_records_it(tmp_path):
    model = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=0))
    set_zero_logit_bias(model, [0.5, 1.0], {"target": 0.4})
    (router, *_) = iter_routers(model)
    assert router.zero_logit_bias.dtype == torch.float32 and router.zero_logit_bias.dim() == 0
    assert "model.layers.0.mlp.gate.zero_logit_bias" in model.state_dict()
    out = export_model(model, str(tmp_path / "m"))
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert [float(weights[f"model.layers.{i}.mlp.gate.zero_logit_bias"]) for i in (0, 1)] == [0.5, 1.0]
    # an edited record loses to the weights, with a warning, and is then made to say what the weights hold
    cfg = json.loads(open(os.path.join(out, "config.json")).read())
    cfg[BUDGET_KEY]["zero_logit_bias"] = [3.0, 3.0]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.warns(UserWarning, match=r"zeda_budget records zero-logit biases \[3.0, 3.0\].*weights' are used"):
        loaded = from_pretrained(out)
    assert zero_logit_biases(loaded) == [0.5, 1.0]
    assert getattr(loaded.config, BUDGET_KEY)["zero_logit_bias"] == [0.5, 1.0]
    # a plain state-dict load restores it: no config involved
    fresh = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=1))
    fresh.load_state_dict(model.state_dict())
    assert zero_logit_biases(fresh) == [0.5, 1.0]


def test_pre_buffer_state_dicts_load_strictly_and_casts_keep_the_bias_exact():
    model = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=0))
    set_zero_logit_bias(model, 0.1)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith(".zero_logit_bias")}  # before the change
    other = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=1))
    other.load_state_dict(old)  # strict: exactly the missing bias buffer is tolerated, it keeps its value
    assert zero_logit_biases(other) == [0.0, 0.0]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*mlp\.gate\.weight"):
        other.load_state_dict({k: v for k, v in old.items() if not k.endswith("mlp.gate.weight")})
    model.to(torch.bfloat16)  # e.g. bf16-true: the knob stays float32, not rounded to bf16
    (router, *_) = iter_routers(model)
    assert router.zero_logit_bias.dtype == torch.float32 and zero_logit_biases(model) == [float(torch.tensor(0.1))] * 2
    assert router.weight.dtype == torch.bfloat16


def test_export_does_not_import_the_budget_module():
    import ast

    import zeda_lightning.export as export

    tree = ast.parse(open(export.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "zeda_lightning.budget" not in imported and "zeda_lightning" not in imported


def test_export_refuses_a_non_empty_path_unless_overwrite(tmp_path):
    model = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=0))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=True"):
        export_model(model, str(out))
    assert os.listdir(out) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        export_model(model, str(tmp_path / "file"))
    with pytest.raises(ValueError, match="not an export written by zeda_lightning"):
        export_model(model, str(out), overwrite=True)  # only this package's own exports are ever replaced
    assert os.listdir(out) == ["notes.txt"]
    export_model(model, str(tmp_path / "exported"))
    export_model(model, str(tmp_path / "exported"), overwrite=True)
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["exported", "file", "out"]  # no temporary siblings left


def test_failed_export_leaves_nothing_behind(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    model = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=0))
    with pytest.raises(OSError, match="disk full"):
        export_model(model, str(tmp_path / "out"), BrokenTokenizer())
    assert os.listdir(tmp_path) == []
    # over an existing export, the old one stays whole
    export_model(model, str(tmp_path / "out"))
    before = {p: (tmp_path / "out" / p).read_bytes() for p in os.listdir(tmp_path / "out")}
    with pytest.raises(OSError, match="disk full"):
        export_model(model, str(tmp_path / "out"), BrokenTokenizer(), overwrite=True)
    assert {p: (tmp_path / "out" / p).read_bytes() for p in os.listdir(tmp_path / "out")} == before
    assert os.listdir(tmp_path) == ["out"]


class _Trap:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_unpickles(tmp_path):
    model = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=0))
    export_model(model, str(tmp_path / "m"))
    marker = tmp_path / "pwned"
    for name in ("pytorch_model.bin", "training_args.pt"):
        (tmp_path / "m" / name).write_bytes(pickle.dumps(_Trap(str(marker))))
    from_pretrained(str(tmp_path / "m"))
    assert not marker.exists()
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="only pickle weight files.*refused"):
        from_pretrained(str(tmp_path / "m"))
    assert not marker.exists()


def test_bad_model_directories_get_clear_errors(tmp_path, tiny_teacher):
    model = inject(tiny_model("qwen3_moe"), ZeroExperts(seed=0))
    good = tmp_path / "good"
    export_model(model, str(good))
    with pytest.raises(ValueError, match="model directory not found"):
        from_pretrained(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        from_pretrained(str(empty))
    (empty / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(ValueError, match="no \\*.safetensors weight files"):
        from_pretrained(str(empty))
    # a sharded index naming a shard that is not there
    (good / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="lists shards that are missing.*00002"):
        from_pretrained(str(good))
    os.remove(good / "model.safetensors.index.json")
    # routing fields required but absent (a plain transformers model)
    with pytest.raises(ValueError, match="no 'zeda_routing' field"):
        from_pretrained(tiny_teacher, require_routing=True)
    with pytest.raises(ValueError, match="no tokenizer files"):
        check_model_dir(str(good), require_tokenizer=True)
    # a budget for layers the model does not have
    cfg = json.loads((good / "config.json").read_text())
    cfg[BUDGET_KEY] = {"layers": [0, 1, 2], "zero_logit_bias": [1.0, 1.0, 1.0]}
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="zeda_budget.layers \\[0, 1, 2\\] do not match"):
        from_pretrained(str(good))
    del cfg[BUDGET_KEY]
    (good / "config.json").write_text(json.dumps(cfg))
    # router tensors missing from the weights
    weights = load_file(str(good / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".gate." not in k}, str(good / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="needs tensors missing from the checkpoint"):
        from_pretrained(str(good))
