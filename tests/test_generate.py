"""Stage-1 data generation: teacher samples for prompts, written as prompt/response jsonl."""

import json

import pytest

from tests.conftest import write_jsonl
from zeda_lightning.cli import main as cli_entry
from zeda_lightning.data.module import ZedaDataModule
from zeda_lightning.generate import generate_responses


def test_generate_writes_prompt_response_rows_usable_as_training_data(tmp_path, tiny_teacher, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "def f(x):", "domain": "code"},
        {"prompt": "12 + 30 =", "domain": "math"},
        {"messages": [{"role": "user", "content": "Tell me about rivers."}], "domain": "prose"},
    ])
    out = tmp_path / "stage1.jsonl"
    cli_entry(["generate", "--model", tiny_teacher, "--prompts", prompts, "--out", str(out),
               "--max_new_tokens", "8", "--num_samples", "2", "--seed", "0"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["rows"] == 6 and len(rows) == 6
    assert [r["domain"] for r in rows] == ["code", "code", "math", "math", "prose", "prose"]
    assert rows[4]["prompt"].startswith("<|im_start|>user\nTell me about rivers.<|im_end|>\n<|im_start|>assistant\n")
    assert all(isinstance(r["response"], str) for r in rows)
    # deterministic under the same seed
    again = tmp_path / "again.jsonl"
    generate_responses(tiny_teacher, prompts, str(again), max_new_tokens=8, num_samples=2, seed=0)
    assert again.read_text() == out.read_text()
    # and loadable as stage-1 SFT data: loss only on response tokens
    nonempty = write_jsonl(tmp_path / "nonempty.jsonl", [r for r in rows if r["response"]] or [{**rows[0], "response": "x"}])
    dm = ZedaDataModule(tokenizer=tiny_teacher, train_files=nonempty, max_length=64)
    dm.setup("fit")
    batch = dm.collate(dm.datasets["train"][:2])
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()


def test_generate_bad_input(tmp_path, tiny_teacher):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}, {"prompt": "word " * 400}])
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        generate_responses(tiny_teacher, prompts, str(tmp_path / "o.jsonl"), num_samples=0)
    with pytest.raises(ValueError, match=r"prompts on lines \[2\] exceed"):
        generate_responses(tiny_teacher, prompts, str(tmp_path / "o.jsonl"), max_new_tokens=8)
    assert not (tmp_path / "o.jsonl").exists()
    (tmp_path / "exists.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        generate_responses(tiny_teacher, prompts, str(tmp_path / "exists.jsonl"))
