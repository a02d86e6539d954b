"""Session fixtures: a tiny saved MoE teacher (real tokenizer + safetensors) and small data files."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

import pytest

_DATASETS_CACHE = tempfile.mkdtemp(prefix="zeda-test-datasets-")


def pytest_configure(config):
    """The tokenised-data cache of every test (and of the CLI runs and notebooks they start) goes to a temporary
    directory, never into the user's datasets cache; set before ``datasets`` reads it at import."""
    os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE


def pytest_unconfigure(config):
    shutil.rmtree(_DATASETS_CACHE, ignore_errors=True)

DOMAINS = ("code", "prose", "math")


def _row(i: int, r: random.Random) -> dict:
    domain = DOMAINS[i % 3]
    if domain == "code":
        text = f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n"
    elif domain == "prose":
        text = f"The river number {i} runs past the old mill and the children watch the boats go by."
    else:
        a, b = r.randint(0, 99), r.randint(0, 99)
        text = f"{a} + {b} = {a + b}. {a} * 2 = {2 * a}."
    return {"text": text, "domain": domain}


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    r = random.Random(0)
    rows = [_row(i, r) for i in range(240)]
    return {
        "train": write_jsonl(root / "train.jsonl", rows[:192]),
        "val": write_jsonl(root / "val.jsonl", rows[192:]),
        "root": root,
    }


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_data):
    """A tiny random Qwen3-MoE saved in transformers format with a trained byte-level BPE tokenizer."""
    from zeda_lightning.data.tokenizer import train_tokenizer
    from zeda_lightning.tiny import tiny_model

    root = tmp_path_factory.mktemp("teacher")
    tok = train_tokenizer([tiny_data["train"]], str(root / "tok"), vocab_size=300)
    model = tiny_model("qwen3_moe", vocab_size=len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return str(root / "model")
