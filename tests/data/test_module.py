"""``ZedaDataModule`` from the user's side: tokens and label masks against the tokenizer called by hand, per-domain
packing, padding, the tokenised-data cache, and resuming the training loader (also across an epoch boundary, and
through a Lightning checkpoint)."""

from __future__ import annotations

import json
import os
import shutil

import lightning as L
import pytest
import torch

from tests.conftest import write_jsonl
from zeda_lightning.data import module as data_module
from zeda_lightning.data.module import IGNORE_INDEX, ZedaDataModule

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEACHER = os.path.join(ROOT, "assets", "tiny_teacher")
DOMAINS = ("code", "prose", "math")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TEACHER)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def text_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        text = (f"def f{i}(x):\n    return x * {i % 7}\n" if i % 3 == 0 else
                f"The river {i} runs past the mill. " * (1 + i % 4) if i % 3 == 1 else f"{i} + {i} = {2 * i}.")
        rows.append({"text": text, **({"domain": DOMAINS[i % 3]} if i % 5 else {})})  # every 5th: no domain
    return rows


def make(tmp_path, **kwargs) -> ZedaDataModule:
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    kwargs.setdefault("tokenizer", TEACHER)
    dm = ZedaDataModule(**kwargs)
    dm.setup("fit")
    return dm


def batches(loader, limit: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


# -- tokens and labels ---------------------------------------------------------------------------------------------
def test_text_prompt_response_and_messages_rows_have_the_tokenizers_tokens_and_label_masks(tmp_path, tok):
    user, assistant = {"role": "user", "content": "what is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}
    rows = [{"text": "The river runs past the old mill."},
            {"prompt": "Question: what is 3 + 4?", "response": " Seven."},
            {"messages": [{"role": "system", "content": "Be brief."}, user, assistant]}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    dm = make(tmp_path, train_files=path, max_length=128, batch_size=3)
    eos = tok.eos_token_id
    text = ids(tok, rows[0]["text"]) + [eos]
    prompt, response = ids(tok, rows[1]["prompt"]), ids(tok, rows[1]["response"]) + [eos]
    head = tok.apply_chat_template(rows[2]["messages"][:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(rows[2]["messages"], tokenize=False)
    chat_prompt, chat_answer = ids(tok, head), ids(tok, full[len(head):])
    expected = [(text, text),
                (prompt + response, [IGNORE_INDEX] * len(prompt) + response),
                (chat_prompt + chat_answer, [IGNORE_INDEX] * len(chat_prompt) + chat_answer)]
    batch = dm.collate(dm.datasets["train"][:3])
    width = max(len(e[0]) for e in expected)
    assert batch["input_ids"].shape == (3, width)
    for i, (want_ids, want_labels) in enumerate(expected):
        n = len(want_ids)
        assert batch["input_ids"][i, :n].tolist() == want_ids
        assert batch["labels"][i, :n].tolist() == want_labels
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["input_ids"][i, n:].tolist() == [tok.pad_token_id] * (width - n)
        assert batch["labels"][i, n:].tolist() == [IGNORE_INDEX] * (width - n)
    for key in ("input_ids", "attention_mask", "labels", "domain"):
        assert batch[key].dtype == torch.long
    assert batch["domain"].tolist() == [-1, -1, -1] and dm.domains == []
    # the loader's batches (Arrow columns, gathered per batch) are the same tensors
    loaded = next(iter(torch.utils.data.DataLoader(dm.datasets["train"], batch_size=3, collate_fn=dm.collate)))
    assert all(torch.equal(loaded[k], batch[k]) for k in batch)


def test_truncation_and_left_padded_prompts(tmp_path, tok):
    rows = [{"prompt": "Question number one, a long one: what is seven times six?", "response": " 42, the answer.",
             "domain": "math"},
            {"prompt": "Name a river.", "response": "", "domain": "prose"},  # prompt only: no loss
            {"text": "def g(y):\n    return y + 1\n", "domain": "code"}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    dm = make(tmp_path, train_files=path, max_length=12, prompts=True, prompt_tokens=4, batch_size=3)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    p0 = ids(tok, rows[0]["prompt"])
    full0 = (p0 + ids(tok, rows[0]["response"]) + [eos])[:12]
    p1 = ids(tok, rows[1]["prompt"])
    t2 = ids(tok, rows[2]["text"]) + [eos]
    assert len(p0) > 12 and len(t2) > 4
    batch = dm.collate(dm.datasets["train"][:3])
    assert batch["input_ids"][0].tolist() == full0
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 12  # the prompt fills the 12 tokens
    assert batch["labels"][1, : len(p1)].tolist() == [IGNORE_INDEX] * len(p1)
    assert batch["labels"][2, : len(t2[:12])].tolist() == t2[:12]
    prompts = [p0[:12], p1, t2[:4]]  # the prompt of a text row: its first prompt_tokens tokens
    width = max(map(len, prompts))
    for i, p in enumerate(prompts):
        assert batch["prompt_ids"][i].tolist() == [pad] * (width - len(p)) + p
        assert batch["prompt_mask"][i].tolist() == [0] * (width - len(p)) + [1] * len(p)
    assert dm.domains == ["code", "math", "prose"] and batch["domain"].tolist() == [1, 2, 0]
    assert [r["prompt_len"] for r in dm.datasets["train"]] == [12, len(p1), 4]


def test_packing_keeps_every_token_and_never_mixes_domains(tmp_path, tok):
    rows = text_rows(120)
    path = write_jsonl(tmp_path / "text.jsonl", rows)
    n = 32
    dm = make(tmp_path, train_files=path, max_length=n, packing=True, batch_size=4)
    streams: dict[int, list[int]] = {}
    for row in rows:  # by hand: each domain's rows back to back, in file order
        d = dm.domains.index(row["domain"]) if "domain" in row else -1
        streams.setdefault(d, []).extend(ids(tok, row["text"]) + [tok.eos_token_id])
    expected = [(d, s[i : i + n]) for d in sorted(streams) for s in [streams[d]] for i in range(0, len(s) - n + 1, n)]
    blocks = list(dm.datasets["train"])
    assert [(b["domain"], b["input_ids"]) for b in blocks] == expected
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    assert {b["domain"] for b in blocks} == {-1, 0, 1, 2}
    # every token is in a block but each domain's last partial block
    assert sum(len(b["input_ids"]) for b in blocks) == sum(len(s) // n * n for s in streams.values())
    # through the loader: full batches of full blocks, each block one domain
    seen = batches(dm.train_dataloader())
    assert len(seen) == len(expected) // 4 and all(b["input_ids"].shape == (4, n) for b in seen)
    by_tokens = {tuple(t): d for d, t in expected}
    for b in seen:
        for row, d in zip(b["input_ids"].tolist(), b["domain"].tolist()):
            assert by_tokens[tuple(row)] == d


def test_packing_prompt_response_rows_masks_the_prompts(tmp_path, tok):
    rows = [{"prompt": f"Question {i}?", "response": f" Answer {i} is {i * 3}."} for i in range(30)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = make(tmp_path, train_files=path, max_length=16, packing=True, batch_size=2)
    tokens, labels = [], []
    for row in rows:
        p, r = ids(tok, row["prompt"]), ids(tok, row["response"]) + [tok.eos_token_id]
        tokens += p + r
        labels += [IGNORE_INDEX] * len(p) + r
    blocks = list(dm.datasets["train"])
    assert [b["input_ids"] for b in blocks] == [tokens[i : i + 16] for i in range(0, len(tokens) - 15, 16)]
    assert [b["labels"] for b in blocks] == [labels[i : i + 16] for i in range(0, len(tokens) - 15, 16)]
    batch = dm.collate(blocks[:2])
    assert batch["labels"].tolist() == [labels[:16], labels[16:32]]


# -- cache -----------------------------------------------------------------------------------------------------------
def test_second_setup_reads_the_cache_and_a_changed_file_is_tokenised_again(tmp_path, tok, monkeypatch):
    path = tmp_path / "text.jsonl"
    write_jsonl(path, text_rows(60))
    first = make(tmp_path, train_files=str(path), val_files=str(path), max_length=48, packing=True, batch_size=2)
    entry = first.cache_entries["train"]
    assert first.cache_entries["val"] == entry  # one file, one entry for both splits
    real = data_module.encode_rows
    calls = []
    monkeypatch.setattr(data_module, "encode_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(data_module, "load_rows", lambda *a, **k: pytest.fail("a cached file was read again"))
    again = make(tmp_path, train_files=str(path), val_files=str(path), max_length=48, packing=True, batch_size=2)
    assert calls == [] and again.cache_entries["train"] == entry
    assert list(again.datasets["train"]) == list(first.datasets["train"])
    monkeypatch.undo()
    # other settings, or another tokenizer, are another entry
    entries = {entry}
    for settings in ({"max_length": 40, "packing": True}, {"max_length": 48, "packing": False}):
        entries.add(make(tmp_path, train_files=str(path), batch_size=2, **settings).cache_entries["train"])
    other_tok = tmp_path / "tok"
    other_tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(TEACHER, name), other_tok)
    with open(other_tok / "chat_template.jinja", "a") as f:
        f.write("\n")
    entries.add(make(tmp_path, tokenizer=str(other_tok), train_files=str(path), max_length=48, packing=True,
                     batch_size=2).cache_entries["train"])
    assert len(entries) == 4
    # new content at the same path: tokenised again, and the new tokens are used
    rows = text_rows(60)
    rows[0] = {"text": "A new first row about rivers and mills.", "domain": "prose"}
    write_jsonl(path, rows)
    monkeypatch.setattr(data_module, "encode_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    changed = make(tmp_path, train_files=str(path), max_length=48, packing=True, batch_size=2)
    assert calls and changed.cache_entries["train"] != entry
    prose = changed.domains.index("prose")
    first_prose = next(b for b in changed.datasets["train"] if b["domain"] == prose)
    assert first_prose["input_ids"][:8] == ids(tok, rows[0]["text"])[:8]


def test_a_failed_build_leaves_no_entry(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "text.jsonl", text_rows(20))

    def broken(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(data_module, "pack_rows", broken)
    with pytest.raises(RuntimeError, match="killed"):
        make(tmp_path, train_files=path, max_length=16, packing=True, batch_size=2)
    left = [n for n in os.listdir(tmp_path / "cache") if not n.endswith(".lock") and n != "digests"]
    assert left == []  # neither an entry nor the temporary directory it was built in
    monkeypatch.undo()
    assert len(make(tmp_path, train_files=path, max_length=16, packing=True, batch_size=2).datasets["train"]) > 2


# -- resuming --------------------------------------------------------------------------------------------------------
def _loader_dm(tmp_path, path, **kwargs) -> ZedaDataModule:
    return make(tmp_path, train_files=path, max_length=24, batch_size=4, seed=3, **kwargs)


def test_a_loader_restored_mid_epoch_or_in_a_later_epoch_replays_the_uninterrupted_batches(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", text_rows(42))  # 42 rows, batch 4: 11 batches, the last of 2
    loader = _loader_dm(tmp_path, path).train_dataloader()
    epochs = [batches(loader) for _ in range(3)]
    assert [len(e) for e in epochs] == [11, 11, 11]
    assert not same(epochs[0], epochs[1]) and not same(epochs[1], epochs[2])  # a new order every epoch
    for epoch, stop in ((0, 4), (1, 7), (0, 11), (1, 0)):
        run = _loader_dm(tmp_path, path).train_dataloader()
        for _ in range(epoch):
            batches(run)
        batches(run, stop) if stop else None
        state = json.loads(json.dumps(run.state_dict()))  # plain data, as in a checkpoint
        resumed = _loader_dm(tmp_path, path).train_dataloader()  # a new process, in effect
        resumed.load_state_dict(state)
        rest = [batches(resumed) for _ in range(3 - epoch - (stop == 11))]
        if stop == 11:  # saved after the epoch's last batch: the next pass is the next epoch
            assert same(rest[0], epochs[epoch + 1])
        else:
            assert same(rest[0], epochs[epoch][stop:]), (epoch, stop)
            assert all(same(r, e) for r, e in zip(rest[1:], epochs[epoch + 1 :]))


def test_a_restored_loader_with_a_worker_replays_the_batches(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", text_rows(40))
    loader = _loader_dm(tmp_path, path, num_workers=1).train_dataloader()
    epochs = [batches(loader) for _ in range(2)]
    run = _loader_dm(tmp_path, path, num_workers=1).train_dataloader()
    batches(run)
    batches(run, 3)
    resumed = _loader_dm(tmp_path, path, num_workers=1).train_dataloader()
    resumed.load_state_dict(run.state_dict())
    assert same(batches(resumed), epochs[1][3:])


class _Recorder(L.LightningModule):
    """Records the batches it trains on; asks for the schedule length like the ZEDA modules, and
    stops after ``stop_at`` steps (a killed run)."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []
        self.stop_at = stop_at

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].tolist())
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.stop_at is not None and self.global_step >= self.stop_at:
            self.trainer.should_stop = True

    def configure_optimizers(self):
        self.trainer.estimated_stepping_batches  # noqa: B018  (with max_epochs: Lightning builds the loader here)
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path, path, limit: dict, stop_at: int | None = None, ckpt_path: str | None = None) -> _Recorder:
    dm = ZedaDataModule(tokenizer=TEACHER, train_files=path, max_length=24, batch_size=4, seed=5,
                        cache_dir=str(tmp_path / "cache"))
    model = _Recorder(stop_at)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path / "run"), **limit,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"),
                                                                       save_top_k=-1, every_n_train_steps=1)])
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("limit", [{"max_steps": 9}, {"max_epochs": 2}], ids=["max_steps", "max_epochs"])
def test_fit_resumed_from_a_checkpoint_in_the_second_epoch_trains_on_the_same_batches(tmp_path, limit):
    # max_epochs: configure_optimizers' estimated_stepping_batches makes the train loader before the checkpoint is
    # loaded, and Lightning then drops the loop's copy of the loader state (Lightning-AI/pytorch-lightning#20550);
    # the data module's own state_dict carries it
    path = write_jsonl(tmp_path / "text.jsonl", text_rows(20))  # 5 batches per epoch
    whole = _fit(tmp_path / "a", path, limit).seen
    assert len(whole) == (9 if "max_steps" in limit else 10)
    first = _fit(tmp_path / "b", path, limit, stop_at=7).seen
    assert first == whole[:7]
    resumed = _fit(tmp_path / "b", path, limit, ckpt_path=str(tmp_path / "b" / "ckpt" / "epoch=1-step=7.ckpt"))
    assert resumed.seen == whole[7:]
