"""The pure side of vLLM serving (main environment, no vLLM): what an export records for vLLM, what the plugin
refuses, and ``generate --engine`` validation before anything is loaded or written."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import write_jsonl
from tests.helpers import export_zero_expert_student, single_thread  # noqa: F401  (autouse: one thread)
from zeda_lightning import NullExperts, ZeroExperts, inject
from zeda_lightning.export import export_model, from_pretrained
from zeda_lightning.generate import generate_responses
from zeda_lightning.serving import (
    NOT_SERVED,
    SERVED_FAMILIES,
    SHARED_EXPERT_FAMILIES,
    VLLM_PYTHON_ENV,
    check_servable,
    check_servable_config,
    served_architectures,
    vllm_python,
)
from zeda_lightning.tiny import tiny_model


def _config(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_teacher):
    return export_zero_expert_student(tiny_teacher, str(tmp_path_factory.mktemp("serve") / "student"), 0.5)


def test_an_export_records_the_plugins_architecture_and_still_loads_in_transformers(tmp_path, tiny_teacher):
    model = inject(from_pretrained(tiny_teacher), ZeroExperts(seed=0))
    out = export_model(model, str(tmp_path / "student"), AutoTokenizer.from_pretrained(tiny_teacher))
    cfg = _config(out)
    assert cfg["architectures"] == ["ZedaQwen3MoeForCausalLM"] and cfg["model_type"] == "qwen3_moe"
    assert served_architectures() == {"ZedaQwen3MoeForCausalLM": "qwen3_moe", "ZedaQwen2MoeForCausalLM": "qwen2_moe",
                                      "ZedaOlmoeForCausalLM": "olmoe", "ZedaMixtralForCausalLM": "mixtral",
                                      "ZedaGlm4MoeForCausalLM": "glm4_moe",
                                      "ZedaGraniteMoeForCausalLM": "granitemoe", "ZedaGptOssForCausalLM": "gpt_oss",
                                      "ZedaErnie4_5_MoeForCausalLM": "ernie4_5_moe",
                                      "ZedaLfm2MoeForCausalLM": "lfm2_moe"}
    assert check_servable(out)["zeda_routing"]["class_path"].endswith("ZeroExperts")
    # the transformers load picks its class by model_type: the same model, logit for logit
    reloaded = from_pretrained(out)
    ids = torch.randint(1, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    # re-exporting the reloaded model keeps one prefix
    again = export_model(reloaded, str(tmp_path / "again"))
    assert _config(again)["architectures"] == ["ZedaQwen3MoeForCausalLM"]


def test_a_plain_export_keeps_the_transformers_architecture(tmp_path, tiny_teacher):
    out = export_model(from_pretrained(tiny_teacher), str(tmp_path / "plain"))
    assert _config(out)["architectures"] == ["Qwen3MoeForCausalLM"]


def test_the_plugin_refuses_what_it_cannot_serve_exactly(tmp_path, tiny_teacher, student):
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    with pytest.raises(ValueError, match="not a zeda export"):
        check_servable(tiny_teacher)
    flex = export_model(inject(tiny_model("flex_olmo"), ZeroExperts(seed=0)), str(tmp_path / "flex"), tok)
    with pytest.raises(ValueError, match=r"does not serve zeda exports of 'flex_olmo': vLLM 0.32 has no FlexOlmo "
                                         r"model of its own .*--engine hf"):
        check_servable(flex)
    for family, (_, reason) in NOT_SERVED.items():  # each names its own reason, in one line
        with pytest.raises(ValueError, match=rf"not serve zeda exports of '{family}': {re.escape(reason)}; use "
                                             r"the transformers engine \(generate --engine hf"):
            check_servable_config({"model_type": family, "zeda_routing": ZeroExperts(seed=0).to_config()}, "x")
    null = export_model(inject(from_pretrained(tiny_teacher), NullExperts()), str(tmp_path / "null"), tok)
    with pytest.raises(ValueError, match="zero_experts routing only"):
        check_servable(null)
    old = tmp_path / "old"  # an export written before the architecture name was recorded
    export_model(from_pretrained(student), str(old), tok)
    cfg = _config(old)
    cfg["architectures"] = ["Qwen3MoeForCausalLM"]
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="re-export the model"):
        check_servable(str(old))


@pytest.mark.parametrize("family", sorted(set(SERVED_FAMILIES) - {"qwen3_moe"}))
def test_every_served_family_exports_servable(tmp_path, tiny_teacher, family):
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    out = export_model(inject(tiny_model(family), ZeroExperts(seed=0)), str(tmp_path / family), tok)
    cfg = check_servable(out)  # qwen2_moe, glm4_moe, ernie4_5_moe: their shared experts are served
    assert cfg["architectures"] == ["Zeda" + SERVED_FAMILIES[family]]
    has_shared = bool(cfg.get("shared_expert_intermediate_size") or cfg.get("n_shared_experts")
                      or cfg.get("moe_num_shared_experts"))
    assert has_shared == (family in SHARED_EXPERT_FAMILIES) == (family in ("qwen2_moe", "glm4_moe", "ernie4_5_moe"))


def test_the_plugin_refuses_family_settings_vllm_computes_differently(tmp_path, tiny_teacher):
    routing = {"zeda_routing": ZeroExperts(seed=0).to_config()}
    cfg = {**tiny_model("mixtral").config.to_dict(), **routing}
    with pytest.raises(ValueError, match=r"shared experts are not supported .* for 'mixtral'"):
        check_servable_config({**cfg, "shared_expert_intermediate_size": 16}, "x")
    with pytest.raises(ValueError, match=r"vLLM's mixtral model computes sliding_window=None, this config has 16"):
        check_servable_config({**cfg, "sliding_window": 16}, "x")
    with pytest.raises(ValueError, match="experts run SiLU.*'gelu'"):
        check_servable_config({**cfg, "hidden_act": "gelu"}, "x")
    olmoe = {**tiny_model("olmoe").config.to_dict(), **routing}
    check_servable_config(olmoe, "x")
    with pytest.raises(ValueError, match=r"olmoe model computes clip_qkv=None, this config has 8.0; use --engine hf"):
        check_servable_config({**olmoe, "clip_qkv": 8.0}, "x")
    qwen2 = {**tiny_model("qwen2_moe").config.to_dict(), **routing}
    with pytest.raises(ValueError, match=r"qwen2_moe model computes qkv_bias=True, this config has False"):
        check_servable_config({**qwen2, "qkv_bias": False}, "x")
    glm4 = {**tiny_model("glm4_moe").config.to_dict(), **routing}
    check_servable_config(glm4, "x")  # its shared experts (n_shared_experts) are served
    with pytest.raises(ValueError, match=r"glm4_moe model computes tie_word_embeddings=False, this config has True"):
        check_servable_config({**glm4, "tie_word_embeddings": True}, "x")
    granite = {**tiny_model("granitemoe").config.to_dict(), **routing}
    check_servable_config(granite, "x")
    with pytest.raises(ValueError, match=r"granitemoe model computes attention_bias=False, this config has True"):
        check_servable_config({**granite, "attention_bias": True}, "x")
    with pytest.raises(ValueError, match=r"shared experts are not supported .* for 'granitemoe'"):
        check_servable_config({**granite, "n_shared_experts": 1}, "x")
    gpt_oss = {**tiny_model("gpt_oss").config.to_dict(), **routing}
    check_servable_config(gpt_oss, "x")
    with pytest.raises(ValueError, match=r"gpt_oss model computes swiglu_limit=7.0, this config has 5.0"):
        check_servable_config({**gpt_oss, "swiglu_limit": 5.0}, "x")
    with pytest.raises(ValueError, match=r"gpt_oss model computes layer_types=\['sliding_attention', "
                                         r"'full_attention'\], this config has \['full_attention'"):
        check_servable_config({**gpt_oss, "layer_types": ["full_attention", "sliding_attention"]}, "x")
    ernie = {**tiny_model("ernie4_5_moe").config.to_dict(), **routing}
    check_servable_config(ernie, "x")  # its shared experts (moe_num_shared_experts) are served
    with pytest.raises(ValueError, match=r"ernie4_5_moe model computes use_bias=False, this config has True"):
        check_servable_config({**ernie, "use_bias": True}, "x")
    check_servable_config({**tiny_model("lfm2_moe").config.to_dict(), **routing}, "x")


def test_generate_engine_is_checked_before_anything_is_written(tmp_path, tiny_teacher, student, monkeypatch):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "def f(x):"}])
    out = tmp_path / "o.jsonl"
    with pytest.raises(ValueError, match=r"engine must be one of \['hf', 'vllm'\], got 'sglang'"):
        generate_responses(student, prompts, str(out), engine="sglang")
    with pytest.raises(ValueError, match="not a zeda export"):
        generate_responses(tiny_teacher, prompts, str(out), engine="vllm")
    monkeypatch.setenv(VLLM_PYTHON_ENV, str(tmp_path / "no-such-python"))
    if vllm_python() is None:  # this interpreter has no vllm: the missing environment is named
        with pytest.raises(ValueError, match="needs the vLLM environment: run `bash scripts/vllm_env.sh`"):
            generate_responses(student, prompts, str(out), engine="vllm")
    proc = subprocess.run(  # the command line: one line, exit status 2
        [sys.executable, "-m", "zeda_lightning", "generate", "--model", tiny_teacher, "--prompts", prompts,
         "--out", str(out), "--engine", "vllm"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and err[0].startswith("zeda_lightning: error: ") and "not a zeda export" in err[0]
    assert not out.exists()


def test_eval_backend_is_checked_before_lm_eval_runs(tiny_teacher, student):
    from zeda_lightning.evaluation.harness import evaluate

    with pytest.raises(ValueError, match=r"backend must be one of \['hf', 'vllm'\], got 'sglang'"):
        evaluate(student, ["zeda_tiny_continuation"], backend="sglang")
    with pytest.raises(ValueError, match="not a zeda export"):
        evaluate(tiny_teacher, ["zeda_tiny_continuation"], backend="vllm")
