"""Sampling settings of ``generate`` from the user's side: out-of-range values are one ``ValueError`` line naming
the argument, raised before the model is loaded (Python functions and ``python -m zeda_lightning generate``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import zeda_lightning.generate as G
import zeda_lightning.sampling as S

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEACHER = os.path.join(ROOT, "assets", "tiny_teacher")

BAD = [
    ("temperature", -0.5, "temperature must be >= 0"),
    ("temperature", float("nan"), "temperature must be >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    ("top_k", -1, "top_k must be >= 0"),
    ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(model):
        raise AssertionError(f"the model was loaded ({model}) before the arguments were checked")

    monkeypatch.setattr(S, "load_for_generation", refuse)  # generate_text's
    monkeypatch.setattr(G, "load_for_generation", refuse)  # the generate command's


@pytest.mark.parametrize("name, value, says", BAD)
def test_generate_text_refuses_bad_sampling_settings_before_loading(no_model_load, name, value, says):
    with pytest.raises(ValueError, match=says):
        S.generate_text(TEACHER, "def f(x):", **{name: value})


@pytest.mark.parametrize("name, value, says", BAD + [
    ("num_samples", 0, "num_samples must be >= 1"),
    ("batch_size", 0, "batch_size must be >= 1"),
    ("max_prompt_tokens", 0, "max_prompt_tokens must be >= 1"),
])
def test_generate_responses_refuses_bad_sampling_settings_before_loading(no_model_load, tmp_path, name, value, says):
    with pytest.raises(ValueError, match=says):
        G.generate_responses(TEACHER, prompt="def f(x):", **{name: value})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def f(x):"}\n')
    with pytest.raises(ValueError, match=says):
        G.generate_responses(TEACHER, prompts=str(prompts), out=str(tmp_path / "out.jsonl"), **{name: value})
    assert not (tmp_path / "out.jsonl").exists()


def test_valid_edge_values_are_accepted(no_model_load):
    S.check_sampling(max_new_tokens=1, temperature=0.0, top_p=1.0, top_k=0, num_samples=1, batch_size=1)
    with pytest.raises(AssertionError, match="the model was loaded"):  # past the checks: it goes on to load
        S.generate_text(TEACHER, "x", temperature=0, top_p=1.0, top_k=0, max_new_tokens=1)


@pytest.mark.parametrize("flag, says", [("--temperature=-1", "temperature must be >= 0 (0 = greedy), got -1.0"),
                                        ("--top_p=0", "top_p must be in (0, 1] (1 = no nucleus cut), got 0.0")])
def test_cli_generate_bad_setting_exits_2_in_one_line_before_loading(tmp_path, flag, says):
    missing = tmp_path / "no_model_here"  # a model is never looked at: the setting is refused first
    proc = subprocess.run([sys.executable, "-m", "zeda_lightning", "generate", "--model", str(missing),
                           "--prompt", "def f(x):", flag], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("zeda_lightning: error:")]
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_tokenizer_is_loaded_without_remote_code(tokenizer_loads):
    _, tok = S.load_for_generation(TEACHER)
    assert tokenizer_loads == [False] and tok.padding_side == "left"


def _greedy_by_hand(lm, ids, steps: int) -> list[int]:
    """Greedy continuation by argmax of full forwards (no cache, no logits processor): the independent reference."""
    import torch

    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(lm(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def test_a_model_directorys_generation_config_does_not_change_sampling(tmp_path):
    """``generation_config.json`` is data from the download: its repetition penalty, suppressed / banned tokens and
    minimum length must not reach stage-1 data or rollouts; greedy output equals argmax decoding by hand."""
    import json
    import shutil

    from zeda_lightning.export import from_pretrained

    model = tmp_path / "m"
    shutil.copytree(TEACHER, model)
    lm, tok = S.load_for_generation(str(model))
    prompt = "def add(a, b):\n    return"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    expected = _greedy_by_hand(lm, ids, 8)
    cfg_path = model / "generation_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg.update(repetition_penalty=50.0, suppress_tokens=expected[:2], bad_words_ids=[[t] for t in expected[2:4]],
               min_new_tokens=8, no_repeat_ngram_size=1)
    cfg_path.write_text(json.dumps(cfg))
    assert from_pretrained(str(model)).generation_config.repetition_penalty == 50.0  # the file is read...
    got = S.generate_text(str(model), prompt, max_new_tokens=8)
    assert tok(got, add_special_tokens=False)["input_ids"] == expected  # ...and ignored while sampling
    lm2, tok2 = S.load_for_generation(str(model))
    out, _ = S.sample(lm2, tok2, [prompt], max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, num_samples=1,
                      max_prompt_tokens=None, where="prompt")
    assert tok2(out[0], add_special_tokens=False)["input_ids"] == expected
    assert lm2.generation_config.repetition_penalty == 50.0  # the caller's model is left as it was
