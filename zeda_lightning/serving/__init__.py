"""Serving zeda exports with vLLM: the checks and the launcher, importable without vLLM.

vLLM pins a transformers older than this package's, so it lives in its own environment (``scripts/vllm_env.sh``
builds ``.vllm-venv``). The main environment talks to it through a subprocess (:func:`run_vllm`), which runs
:mod:`zeda_lightning.serving.worker` there; the model classes themselves are in :mod:`zeda_lightning.serving.plugin`,
registered through the ``vllm.general_plugins`` entry point (it and :mod:`zeda_lightning.serving.families`, one file
per family, are the only modules that import vLLM).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

from zeda_lightning.adapters import CONFIG_KEY
from zeda_lightning.export import SERVING_ARCH_PREFIX, check_model_dir, serving_architecture
from zeda_lightning.routing import routing_from_config
from zeda_lightning.routing.zero_experts import ZeroExperts

#: model_type -> the transformers architecture the plugin serves a zeda export of (vLLM has a CPU model for it;
#: the model class is ``zeda_lightning/serving/families/<model_type>.py``)
SERVED_FAMILIES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "granitemoe": "GraniteMoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
    "lfm2_moe": "Lfm2MoeForCausalLM",
}

#: model_type -> (transformers architecture, why the plugin does not serve zeda exports of it): families the
#: package supports that vLLM 0.32 has no model for, or whose vLLM model does not compute as transformers on the
#: CPU backend (checked with plain vLLM on small random models); the refusal names the reason
NOT_SERVED: dict[str, tuple[str, str]] = {
    "flex_olmo": ("FlexOlmoForCausalLM", "vLLM 0.32 has no FlexOlmo model of its own (only its generic "
                                         "transformers backend, which the plugin cannot patch)"),
    "hunyuan_v1_moe": ("HunYuanMoEV1ForCausalLM", "vLLM 0.32 has no HunYuan-MoE-V1 model of its own (only its "
                                                  "generic transformers backend, which the plugin cannot patch)"),
    "dots1": ("Dots1ForCausalLM", "vLLM 0.32 has no dots1 model (removed in vLLM 0.23)"),
    "qwen3_next": ("Qwen3NextForCausalLM", "vLLM 0.32's CPU gated-delta-net kernel runs bf16 only (\"CPU GDN "
                                           "attention requires BF16.\"), so no fp32 parity with transformers can be "
                                           "shown (bf16 against fp32: prompt log-probs up to 0.075 off)"),
    "glm4_moe_lite": ("Glm4MoeLiteForCausalLM", "vLLM 0.32's MLA attention does not match transformers on the CPU "
                                                "backend (prompt log-probs differ by up to 0.3)"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "vLLM 0.32's MLA attention does not match transformers on the CPU "
                                             "backend (prompt log-probs differ by up to 1.15)"),
}

#: families whose served block has the shared expert (``shared_expert_intermediate_size`` > 0 allowed)
SHARED_EXPERT_FAMILIES = frozenset({"qwen2_moe", "glm4_moe", "ernie4_5_moe"})

#: model_type -> {config key: the one value vLLM's model for the family computes (also transformers' default)}:
#: vLLM would serve another value differently from transformers, so it is refused
_VLLM_ASSUMES: dict[str, dict[str, object]] = {
    "qwen2_moe": {"qkv_bias": True, "use_sliding_window": False},
    "olmoe": {"rms_norm_eps": 1e-5, "clip_qkv": None, "tie_word_embeddings": False},
    "mixtral": {"sliding_window": None},
    "glm4_moe": {"tie_word_embeddings": False},
    "granitemoe": {"attention_bias": False},
    # vLLM's GPT-OSS: biased attention, norms at eps 1e-5, sliding window on even layers, SwiGLU clamped at 7.0
    # with alpha 1.702, unquantised experts only through the plugin's kept-pairs block
    "gpt_oss": {"attention_bias": True, "rms_norm_eps": 1e-5, "swiglu_limit": 7.0, "swiglu_alpha": 1.702,
                "quantization_config": None,
                "layer_types": lambda cfg: ["full_attention" if i % 2 else "sliding_attention"
                                            for i in range(cfg["num_hidden_layers"])]},
    "ernie4_5_moe": {"use_bias": False},
}

#: environment variable naming the vLLM environment's python (default: ``<repo>/.vllm-venv/bin/python``)
VLLM_PYTHON_ENV = "ZEDA_VLLM_PYTHON"

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def served_architectures() -> dict[str, str]:
    """Architecture name recorded by an export -> model_type, for every family the plugin serves."""
    return {serving_architecture(arch): family for family, arch in SERVED_FAMILIES.items()}


def check_servable_config(cfg: dict, where: str) -> ZeroExperts:
    """Refuse a config the plugin cannot serve exactly (one line naming what to do); returns its routing variant."""
    if CONFIG_KEY not in cfg:
        raise ValueError(f"{where}: config.json has no {CONFIG_KEY!r}, so it is not a zeda export; serve a plain model "
                         "with vLLM's own architecture (drop any Zeda* architecture override)")
    family = cfg.get("model_type")
    if family in NOT_SERVED:
        raise ValueError(f"{where}: the vLLM plugin does not serve zeda exports of {family!r}: "
                         f"{NOT_SERVED[family][1]}; use the transformers engine (generate --engine hf, "
                         "eval --backend hf)")
    if family not in SERVED_FAMILIES:
        raise ValueError(f"{where}: the vLLM plugin serves zeda exports of {sorted(SERVED_FAMILIES)}, not "
                         f"{family!r}; use the transformers engine (generate --engine hf, eval --backend hf)")
    routing = routing_from_config(cfg[CONFIG_KEY], where=f"{where}: {CONFIG_KEY}")
    if type(routing) is not ZeroExperts:
        raise ValueError(f"{where}: the vLLM plugin serves the zero_experts routing only, not "
                         f"{cfg[CONFIG_KEY].get('class_path')!r}; use the transformers engine (--engine hf)")
    if (cfg.get("shared_expert_intermediate_size") or cfg.get("n_shared_experts")
            or cfg.get("moe_num_shared_experts")) and family not in SHARED_EXPERT_FAMILIES:
        raise ValueError(f"{where}: shared experts are not supported by the zeda vLLM plugin for {family!r} (only "
                         f"{sorted(SHARED_EXPERT_FAMILIES)}); use --engine hf")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: the zeda vLLM plugin's experts run SiLU (vLLM's fused-MoE default), not "
                         f"{cfg['hidden_act']!r}; use --engine hf")
    for key, served in _VLLM_ASSUMES.get(family, {}).items():
        served = served(cfg) if callable(served) else served
        if cfg.get(key, served) != served:
            raise ValueError(f"{where}: vLLM's {family} model computes {key}={served!r}, this config has "
                             f"{cfg[key]!r}; use --engine hf")
    return routing


def check_servable(path: str) -> dict:
    """Validate a model directory for the vLLM engine, loading no weights; returns its config.

    A zeda export of a served family is required, with the architecture name the plugin registers recorded (an
    export written before that is refused with how to fix it)."""
    cfg = check_model_dir(path, require_routing=True, require_tokenizer=True)
    check_servable_config(cfg, path)
    archs = cfg.get("architectures") or []
    wanted = serving_architecture(SERVED_FAMILIES[cfg["model_type"]])
    if archs != [wanted]:
        raise ValueError(f"{path}: config.json architectures is {archs}, the vLLM plugin serves {[wanted]}; "
                         "re-export the model with this version (export_model records it)")
    return cfg


def vllm_python() -> str | None:
    """The vLLM environment's python: this interpreter if it imports vllm, else ``$ZEDA_VLLM_PYTHON`` or the
    repository's ``.vllm-venv``; ``None`` when there is none."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    candidate = os.environ.get(VLLM_PYTHON_ENV) or os.path.join(_REPO, ".vllm-venv", "bin", "python")
    return candidate if os.path.isfile(candidate) and os.access(candidate, os.X_OK) else None


def require_vllm_python() -> str:
    """:func:`vllm_python` or a one-line error saying how to get one."""
    python = vllm_python()
    if python is None:
        raise ValueError("the vLLM engine needs the vLLM environment: run `bash scripts/vllm_env.sh` (builds "
                         f".vllm-venv) or set {VLLM_PYTHON_ENV} to a python with vllm and zeda_lightning installed")
    return python


def vllm_env() -> dict[str, str]:
    """The environment of a vLLM subprocess: this checkout importable, only the zeda vLLM plugin loaded."""
    env = {**os.environ, "VLLM_PLUGINS": os.environ.get("VLLM_PLUGINS", "zeda"), "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH")) if p)
    return env


def run_vllm(request: dict, timeout: float | None = None) -> dict:
    """Run one :mod:`zeda_lightning.serving.worker` request in the vLLM environment; returns its JSON reply.

    The request (model, prompt texts, sampling settings) goes in a temporary file and the reply comes back in
    another; the worker's log is kept only for the error message."""
    python = require_vllm_python()
    with tempfile.TemporaryDirectory(prefix="zeda-vllm-") as tmp:
        req, rep = os.path.join(tmp, "request.json"), os.path.join(tmp, "reply.json")
        with open(req, "w") as f:
            json.dump(request, f)
        proc = subprocess.run([python, "-m", "zeda_lightning.serving.worker", req, rep], env=vllm_env(),
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.isfile(rep):
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"the vLLM worker failed (exit {proc.returncode}): {tail[-600:]}")
        with open(rep) as f:
            return json.load(f)


__all__ = ["NOT_SERVED", "SERVED_FAMILIES", "SERVING_ARCH_PREFIX", "SHARED_EXPERT_FAMILIES", "check_servable",
           "check_servable_config", "run_vllm", "served_architectures", "vllm_env", "vllm_python"]
