"""The byte-level BPE tokenizer trained on the offline corpus."""

from __future__ import annotations

import json

import pytest

from zeda_lightning.data import corpus as C
from zeda_lightning.data import tokenizer as T

VOCAB = 1024


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    C.build_corpus(folder, seed=0, max_docs_per_domain=80)
    return folder


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok = T.train_tokenizer([data / "train.jsonl"], out, vocab_size=VOCAB)
    return tok, out


def _samples(data, split: str = "val") -> dict[str, list[str]]:
    rows = C.read_jsonl(data / f"{split}.jsonl")
    return {d: [r["text"] for r in rows if r["domain"] == d] for d in C.DOMAINS}


TRICKY = [
    "",
    " leading space and trailing space ",
    "tabs\tand\n\nnew lines\r\nwith CRLF\r\n",
    "    indented = [1, 2, 3]  # comment\n\tdef f(): return {'a': 1}\n",
    "Unicode: héllo wörld — “quotes” ünïcödé, 日本語, emoji 😀👍🏽",
    "12 + 35 = 47\n3/4 + 1/8 = 7/8\n-5 * (-3) = 15\n2^10 = 1024",
    "multiple     spaces\u00a0and nbsp",
]


def test_vocab_and_special_tokens(trained):
    tok, _ = trained
    assert 256 + 3 < len(tok) <= VOCAB
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token == tok.pad_token == tok.bos_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == 0
    assert set(tok.all_special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    # nothing is added around a plain text
    assert tok("hello world")["input_ids"] == tok.encode("hello world", add_special_tokens=False)
    # special tokens are atomic in text, and skipped on request
    ids = tok("<|im_start|>user\nhi<|im_end|><|endoftext|>")["input_ids"]
    assert ids[0] == 1 and ids[-2:] == [2, 0]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_round_trip_on_every_domain(trained, data):
    tok, _ = trained
    samples = _samples(data)
    for domain, texts in samples.items():
        assert texts, domain
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.decode(ids) == text, domain
    for text in TRICKY:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_compresses_and_splits_digits(trained, data):
    tok, _ = trained
    stats = T.tokenizer_stats(tok, data / "val.jsonl")
    assert set(stats["domains"]) == set(C.DOMAINS)
    for domain, d in stats["domains"].items():
        assert d["chars_per_token"] > 1.3, (domain, d)  # BPE merges do work on every domain
    assert stats["domains"]["prose"]["chars_per_token"] > stats["domains"]["math"]["chars_per_token"]
    # numbers are spelled one digit per token, whatever was frequent in the corpus
    assert tok.convert_ids_to_tokens(tok.encode("12345", add_special_tokens=False)) == list("12345")
    assert tok.convert_ids_to_tokens(tok.encode("x = 100", add_special_tokens=False))[-3:] == ["1", "0", "0"]


def test_chat_template(trained):
    tok, _ = trained
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids.count(1) == 2 and ids.count(2) == 2
    assert tok.decode(ids) == text


def test_reload_from_disk_is_identical(trained, data):
    from transformers import AutoTokenizer

    tok, out = trained
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    again = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert again.get_vocab() == tok.get_vocab()
    assert (again.eos_token_id, again.pad_token_id, again.bos_token_id) == (0, 0, 0)
    texts = [t for ts in _samples(data).values() for t in ts[:5]] + TRICKY
    for text in texts:
        assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    batch_a = tok(texts[:4], padding=True)
    batch_b = again(texts[:4], padding=True)
    assert batch_a["input_ids"] == batch_b["input_ids"] and batch_a["attention_mask"] == batch_b["attention_mask"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(): pass"}]
    assert again.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert T.load_tokenizer(out).get_vocab() == tok.get_vocab()


def test_training_is_deterministic_and_save_is_atomic(trained, data, tmp_path):
    _, out = trained
    out2 = tmp_path / "tok"
    T.train_tokenizer(data / "train.jsonl", out2, vocab_size=VOCAB)
    assert (out2 / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert json.loads((out2 / "tokenizer_config.json").read_text()) == json.loads(
        (out / "tokenizer_config.json").read_text()
    )
    # saving again over an existing folder replaces it and leaves no temp folders behind
    small = T.train_tokenizer(data / "train.jsonl", out2, vocab_size=300)
    assert len(small) <= 300
    assert len(json.loads((out2 / "tokenizer.json").read_text())["model"]["vocab"]) <= 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_too_small_vocab_raises(data):
    with pytest.raises(ValueError):
        T.train_tokenizer(data / "train.jsonl", None, vocab_size=100)


def test_cli(data, tmp_path, capsys):
    from zeda_lightning.cli import main

    main(["tokenizer", "--data", str(data), "--out", str(tmp_path / "t"), "--vocab_size", "512"])
    stats = json.loads(capsys.readouterr().out)
    assert stats["vocab_size"] <= 512
    assert set(stats["val"]["domains"]) == set(C.DOMAINS)
    assert (tmp_path / "t" / "tokenizer.json").is_file()
