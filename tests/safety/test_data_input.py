"""Untrusted data files and tokenizer directories, from the user's side: ``ZedaDataModule(...).check()`` and
``python -m zeda_lightning fit``. Bad input is one ``ValueError`` line naming file / line / field (or argument)
and the fix, raised before anything is written; valid input does not crash."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import write_jsonl
from zeda_lightning.data.module import ZedaDataModule

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEACHER = os.path.join(ROOT, "assets", "tiny_teacher")  # the shipped tiny teacher: real tokenizer, 2048 tokens
OK_ROWS = [{"text": f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n", "domain": "code"} for i in range(40)]
USER, ASSISTANT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}


def _error(**kwargs) -> str:
    """The one-line ValueError that ``check()`` raises for this data module."""
    kwargs.setdefault("tokenizer", TEACHER)
    with pytest.raises(ValueError) as err:
        ZedaDataModule(**kwargs).check()
    message = str(err.value)
    assert "\n" not in message, message
    return message


# -- CLI helpers -----------------------------------------------------------------------------------------------
def _config(tmp_path, **data_args) -> tuple[str, str]:
    """configs/tiny.yaml cut to a 2-step run with every output under ``tmp_path / "run"``."""
    root = tmp_path / "run"
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny.yaml")))
    trainer = cfg["trainer"]
    trainer.update({"max_steps": 2, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 1,
                    "default_root_dir": str(root), "enable_progress_bar": False, "enable_model_summary": False})
    trainer["logger"]["init_args"].update({"save_dir": str(root), "name": "logs"})
    trainer["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True, "save_top_k": 0}}]
    cfg["model"]["init_args"]["export_dir"] = str(root / "student")
    cfg["data"]["init_args"].update({"batch_size": 2, "max_length": 64, **data_args})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), str(root)


def _fit(config: str):
    return subprocess.run([sys.executable, "-m", "zeda_lightning", "fit", "--config", config], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def _cli_error(tmp_path, **data_args) -> str:
    """Runs ``fit`` on bad data; asserts exit 2, exactly one ``zeda_lightning: error:`` line, nothing written."""
    config, root = _config(tmp_path, **data_args)
    proc = _fit(config)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("zeda_lightning: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(root), "nothing may be written on bad input"
    return lines[0]


# -- 1. tokenizer directory --------------------------------------------------------------------------------------
def test_tokenizer_directory_without_tokenizer_files_is_refused(tmp_path):
    bare = tmp_path / "teacher_without_tokenizer"
    bare.mkdir()
    shutil.copy(os.path.join(TEACHER, "config.json"), bare)  # a model directory, but no tokenizer files
    train = write_jsonl(tmp_path / "train.jsonl", OK_ROWS)
    message = _error(tokenizer=str(bare), train_files=train)
    assert str(bare) in message and "no tokenizer files" in message and "data.init_args.tokenizer" in message


def test_fit_with_a_tokenizer_directory_without_tokenizer_files_exits_2(tmp_path):
    bare = tmp_path / "teacher_without_tokenizer"
    bare.mkdir()
    shutil.copy(os.path.join(TEACHER, "config.json"), bare)
    train = write_jsonl(tmp_path / "train.jsonl", OK_ROWS)
    line = _cli_error(tmp_path, tokenizer=str(bare), train_files=train, val_files=train)
    assert str(bare) in line and "no tokenizer files" in line


def test_tokenizer_with_a_tiny_vocabulary_or_no_eos_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    train = write_jsonl(tmp_path / "train.jsonl", OK_ROWS)
    tiny = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2, "</s>": 3}, unk_token="<unk>"))
    tiny.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tiny, eos_token="</s>").save_pretrained(tmp_path / "tiny")
    message = _error(tokenizer=str(tmp_path / "tiny"), train_files=train)
    assert str(tmp_path / "tiny") in message and "only 4 tokens" in message

    noeos = tmp_path / "noeos"
    shutil.copytree(os.path.join(ROOT, "assets", "tiny_tokenizer"), noeos)
    cfg = json.loads((noeos / "tokenizer_config.json").read_text())
    for key in ("eos_token", "bos_token", "pad_token"):
        cfg.pop(key, None)
    (noeos / "tokenizer_config.json").write_text(json.dumps(cfg))
    message = _error(tokenizer=str(noeos), train_files=train)
    assert str(noeos) in message and "no eos token" in message and "add_eos: false" in message


def test_tokenizer_is_loaded_without_remote_code(tmp_path, tokenizer_loads):
    ZedaDataModule(tokenizer=TEACHER, train_files=write_jsonl(tmp_path / "t.jsonl", OK_ROWS[:2])).check()
    assert tokenizer_loads == [False]


# -- 2. packed splits shorter than one block --------------------------------------------------------------------
def _tokens(rows) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TEACHER)
    return sum(len(tok(r["text"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)  # + EOS


def test_packed_validation_or_training_file_shorter_than_one_block_is_refused(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", OK_ROWS)
    short = write_jsonl(tmp_path / "val.jsonl", OK_ROWS[:2])
    n = _tokens(OK_ROWS[:2])
    assert n < 64
    message = _error(train_files=train, val_files=short, packing=True, max_length=64, batch_size=2)
    assert message.startswith(f"{short}: {n} tokens") and "max_length=64" in message and "val" in message
    message = _error(train_files=short, val_files=train, packing=True, max_length=64, batch_size=2)
    assert message.startswith(f"{short}: {n} tokens") and "max_length=64" in message and "train" in message
    # the same files unpacked, or packed into blocks that fit, are fine
    ZedaDataModule(tokenizer=TEACHER, train_files=train, val_files=short, max_length=64).check()
    ZedaDataModule(tokenizer=TEACHER, train_files=train, val_files=short, packing=True, max_length=n).check()


def test_fit_with_a_packed_validation_file_shorter_than_one_block_exits_2(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", OK_ROWS)
    short = write_jsonl(tmp_path / "val.jsonl", OK_ROWS[:2])
    line = _cli_error(tmp_path, train_files=train, val_files=short)  # tiny.yaml packs; max_length 64 here
    assert f"{short}: {_tokens(OK_ROWS[:2])} tokens" in line and "max_length=64" in line


def test_check_tokenises_once_and_setup_reuses_it(tmp_path, monkeypatch):
    """The preflight's tokenisation is the run's: one batched pass per dataset, reused by setup and by a second
    data module on the same files (the on-disk cache)."""
    from zeda_lightning.data import module as data_module

    train = write_jsonl(tmp_path / "train.jsonl", OK_ROWS)
    calls, real = [], data_module.encode_rows
    monkeypatch.setattr(data_module, "encode_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(tokenizer=TEACHER, train_files=train, val_files=train, packing=True, max_length=64, batch_size=2,
              cache_dir=str(tmp_path / "cache"))
    dm = ZedaDataModule(**kw)
    dm.check()
    assert len(calls) == 1 and set(dm.datasets) == {"train", "val"}
    dm.setup("fit")
    dm.setup("validate")
    ZedaDataModule(**kw).setup("fit")
    assert len(calls) == 1
    assert len(next(iter(dm.train_dataloader()))["input_ids"]) == 2


# -- 3. arguments ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, value", [
    ("batch_size", 0), ("batch_size", -2), ("eval_batch_size", 0), ("max_length", 0), ("max_length", -1),
    ("prompt_tokens", 0), ("num_workers", -1),
])
def test_bad_arguments_are_refused_at_construction(name, value):
    with pytest.raises(ValueError, match=rf"ZedaDataModule: {name} must be an integer >= \d, got {value}"):
        ZedaDataModule(tokenizer=TEACHER, train_files="unused.jsonl", **{name: value})


def test_fit_with_batch_size_0_exits_2(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", OK_ROWS)
    line = _cli_error(tmp_path, train_files=train, val_files=train, batch_size=0)
    assert "batch_size must be an integer >= 1, got 0" in line and "data.init_args.batch_size" in line


# -- 4. field types ----------------------------------------------------------------------------------------------
TEXT = [{"text": "one"}, {"text": "two"}]
PAIR = [{"prompt": "q", "response": "a"}]
CHAT = [{"messages": [USER, ASSISTANT]}]


@pytest.mark.parametrize("rows, line, field, says", [
    (TEXT + [{"text": 3}], 3, "text", "must be a string, got int 3"),
    (TEXT + [{"text": ["a", "b"]}], 3, "text", "must be a string, got list"),
    (TEXT + [{"text": {"a": 1}}], 3, "text", "must be a string, got dict"),
    (PAIR + [{"prompt": 7, "response": "a"}], 2, "prompt", "must be a string, got int"),
    (PAIR + [{"prompt": "q", "response": ["a"]}], 2, "response", "must be a string, got list"),
    (CHAT + [{"messages": "hello"}], 2, "messages", "must be a list of turns, got str"),
    (CHAT + [{"messages": {"role": "user"}}], 2, "messages", "must be a list of turns, got dict"),
    (CHAT + [{"messages": ["hi", "there"]}], 2, "messages", "turn 1: must be an object, got str"),
    (CHAT + [{"messages": [{"content": "hi"}, ASSISTANT]}], 2, "messages", "turn 1: missing 'role'"),
    (CHAT + [{"messages": [USER, {"role": "assistant"}]}], 2, "messages", "turn 2: missing 'content'"),
    (CHAT + [{"messages": [USER, {"role": "assistant", "content": 5}]}], 2, "messages", "'content' must be a string"),
    (CHAT + [{"messages": [USER]}], 2, "messages", "has no assistant turn"),
    (CHAT + [{"messages": [USER, ASSISTANT, USER]}], 2, "messages", "must end with an assistant turn"),
    (TEXT + [{"text": "three", "domain": 3}], 3, "domain", "must be a string"),
])
def test_bad_field_names_file_line_and_field(tmp_path, rows, line, field, says):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    message = _error(train_files=path)
    assert message.startswith(f"{path}, line {line}: ") and f"field {field!r}" in message and says in message


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"\n')
    message = _error(train_files=str(path))
    assert message.startswith(f"{path}, line 3: not valid JSON")


def test_rows_datasets_cannot_load_still_name_line_and_field(tmp_path):
    # a blank line plus a number among strings: pyarrow's cast fails and datasets raises (this datasets version);
    # the user still gets the real line and the field, not an Arrow message
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n\n{"text": 3}\n')
    message = _error(train_files=str(path))
    assert message.startswith(f"{path}, line 5: field 'text' must be a string, got int 3")


def test_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": ""}\n')
    assert _error(train_files=str(path)).startswith(f"{path}, line 3: missing or empty field 'text'")


def test_generation_prompts_may_end_with_a_user_turn(tmp_path):
    from zeda_lightning.data.files import load_rows

    path = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [USER]}, {"prompt": "q", "response": ""}])
    assert len(load_rows(path, prompts_only=True)) == 2
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [USER]}, {"messages": [{"role": "user", "content": 1}]}])
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: field 'messages', turn 1: 'content' must be a string"):
        load_rows(bad, prompts_only=True)


# -- 5. valid input that crashed: one domain for every row -----------------------------------------------------
def test_fit_where_every_row_has_the_same_domain_logs_that_domain(tmp_path):
    # Needs the fix in zeda_lightning/modules/distill.py _log_eval (``iteration over a 0-d tensor`` with one domain).
    train = write_jsonl(tmp_path / "train.jsonl", OK_ROWS)
    config, root = _config(tmp_path, train_files=train, val_files=train)
    proc = _fit(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (metrics,) = glob.glob(os.path.join(root, "logs", "version_*", "metrics.csv"))
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("val/zero_ratio/code") not in (None, "") for r in rows), rows[:1]
