"""Stage-2 rollouts sampled by a vLLM engine beside the run (``rollout_engine: vllm``): the engine samples the
weights it was last handed, and a short on-policy run trains on its rollouts. Skipped without the vLLM environment
(``bash scripts/vllm_env.sh``), like the plugin's tests."""

import os
import subprocess

import pytest
import torch
from transformers import AutoTokenizer

from tests.helpers import export_zero_expert_student, single_thread  # noqa: F401  (autouse: one thread)
from tests.modules.test_distill import read_metrics, series
from tests.modules.test_opd import opd_config
from tests.serving.test_vllm_plugin import TEACHER, heldout_prompts
from zeda_lightning.cli import cli_main
from zeda_lightning.export import from_pretrained
from zeda_lightning.sampling import eos_token_ids
from zeda_lightning.serving import vllm_python
from zeda_lightning.serving.engine import VllmEngine

pytestmark = pytest.mark.skipif(vllm_python() is None and os.environ.get("ZEDA_REQUIRE_VLLM") != "1",
                                reason="no vLLM environment: bash scripts/vllm_env.sh")


def _hf_greedy(lm, prompts: list[list[int]], eos: list[int], new_tokens: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            seq = lm.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                              eos_token_id=eos, pad_token_id=eos[0])
            out.append(seq[0, len(ids):].tolist())
    return out


def _engine_processes() -> int:
    proc = subprocess.run(["pgrep", "-f", "zeda_lightning.serving.engine_worker"], capture_output=True, text=True)
    return len(proc.stdout.split())


def test_the_engine_samples_the_weights_it_was_last_handed(tmp_path):
    """Greedy continuations of the engine equal transformers' for the student it started from, and, after the
    student's routers and experts moved, for the moved student once its weights were handed over."""
    student = export_zero_expert_student(TEACHER, str(tmp_path / "student"))
    lm, tok = from_pretrained(student), AutoTokenizer.from_pretrained(student)
    prompts, eos = heldout_prompts(tok, 8), eos_token_ids(lm, tok)
    with VllmEngine(student, max_model_len=512) as engine:
        got = engine.generate(prompts, max_new_tokens=8, temperature=0.0, eos_token_ids=eos)
        before = _hf_greedy(lm, prompts, eos, 8)
        assert [o[0] for o in got["token_ids"]] == before
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # what some optimiser steps would do to routers and experts
            for name, p in lm.named_parameters():
                if ".mlp." in name:
                    p.add_(0.5 * p.std() * torch.randn(p.shape, generator=generator))
        moved = _hf_greedy(lm, prompts, eos, 8)
        assert sum(a != b for a, b in zip(moved, before)) >= 4  # the test can tell stale weights from fresh
        assert engine.load_weights(lm)["tensors"] > 0
        got = engine.generate(prompts, max_new_tokens=8, temperature=0.0, eos_token_ids=eos)
        assert [o[0] for o in got["token_ids"]] == moved
        assert 0 < got["zero_slots"] < got["slots"]


def test_on_policy_distillation_trains_on_vllm_rollouts(tmp_path, tiny_data):
    """A short stage-2 run with rollouts from the engine: every step samples (time logged), losses and the reverse
    KL stay finite, and the engine is gone when fit ends."""
    student = export_zero_expert_student(TEACHER, str(tmp_path / "student"))
    config, root = opd_config(tmp_path, TEACHER, tiny_data, student=student, steps=3, rollout_engine="vllm",
                              routing_replay=False, vllm_engine={"max_model_len": 512})
    before = _engine_processes()
    cli_main(["fit", "--config", config])
    rows = read_metrics(root)
    sampled = series(rows, "train/time_sample_s")
    assert len(sampled) == 3 and all(t > 0 for t in sampled), sampled
    assert all(torch.isfinite(torch.tensor(series(rows, k))).all() for k in ("train/loss", "train/reverse_kl"))
    assert series(rows, "train/response_tokens") and min(series(rows, "train/response_tokens")) >= 1
    assert _engine_processes() == before
