"""Stage-1 data generation: teacher samples for prompts, written as prompt/response jsonl."""

import json

import pytest

from tests.conftest import write_jsonl
from zeda_lightning.cli import main as cli_entry
from zeda_lightning.data.module import ZedaDataModule
from zeda_lightning.generate import generate_responses
from tests.helpers import single_thread  # noqa: F401  (autouse: one intra-op thread)


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


# -- single prompt, Python function, real skipping during generation ---------------------------------------------
@pytest.fixture(scope="module")
def budget_student(tmp_path_factory, tiny_teacher):
    """The tiny teacher with zero experts and a zero-logit bias that sends about half the slots to zero experts."""
    from tests.helpers import export_zero_expert_student

    return export_zero_expert_student(tiny_teacher, str(tmp_path_factory.mktemp("gen") / "student"), 1.5)


def _expert_rows(model):
    """Hook counting the (token, expert) pairs each experts module really receives (after the sentinel pre-hook
    drops skipped slots): the rows its expert matmuls compute."""
    rows, handles = [], []
    for m in model.modules():
        if getattr(m, "_zeda_skip", None) is not None or m.__class__.__name__.endswith("Experts"):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, kw: rows.append((list(args) + list(kw.values()))[1].numel()),
                with_kwargs=True))
    return rows, handles


def test_generate_text_greedy_matches_a_cache_free_argmax_loop_with_skipping(budget_student):
    import torch

    from zeda_lightning.sampling import generate_text, load_for_generation
    from zeda_lightning.routing import capture_routing

    model, tok = load_for_generation(budget_student)
    prompts = ["def f(x):", "The river number 3 runs past"]
    texts = generate_text(model, prompts, tok, max_new_tokens=6)
    assert texts == [generate_text(budget_student, p, max_new_tokens=6) for p in prompts]  # path and model agree
    # independent computation: full forward over the growing sequence (no KV cache), argmax each step
    for prompt, text in zip(prompts, texts):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            for _ in range(6):
                nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
                if int(nxt) == tok.eos_token_id:
                    break
        expected = tok.decode(ids[0, len(tok(prompt, add_special_tokens=False)["input_ids"]):],
                              skip_special_tokens=True)
        assert text == expected
    # prefill and every decode step compute only the kept slots
    rows, handles = _expert_rows(model)
    try:
        with capture_routing(model, accumulate=True) as rec:
            generate_text(model, prompts[0], tok, max_new_tokens=6)
    finally:
        for h in handles:
            h.remove()
    kept = [int((~o.skipped).sum()) for layer in sorted(rec) for o in rec[layer]]
    k = model.config.num_experts_per_tok
    total = [o.skipped.numel() for layer in sorted(rec) for o in rec[layer]]
    assert len(rec[0]) >= 2  # a prefill and decode steps
    # (a step whose every slot is skipped runs one dummy row of weight 0, see adapters/skipping.py)
    assert sorted(rows) == sorted(max(n, 1) for n in kept) and 0.25 < 1 - sum(kept) / sum(total) < 0.75
    assert rec[0][1].selected_experts.shape[0] == 1  # a decode step routes one token: the cache is used
    assert sum(kept) < sum(total) and all(t % k == 0 for t in total)


def test_generate_single_prompt_cli_prints_response_and_zero_ratio(budget_student, capsys):
    from zeda_lightning.sampling import generate_text

    cli_entry(["generate", "--model", budget_student, "--prompt", "12 + 30 =", "--temperature", "0",
               "--max_new_tokens", "5"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["response"] == generate_text(budget_student, "12 + 30 =", max_new_tokens=5)
    assert 0.25 < result["zero_ratio"] < 0.75 and result["new_tokens"] >= 1


def test_generate_single_prompt_bad_input(tmp_path, budget_student, tiny_teacher):
    from zeda_lightning.sampling import generate_text

    with pytest.raises(ValueError, match="exactly one of them"):
        generate_responses(budget_student)
    with pytest.raises(ValueError, match="exactly one of them"):
        generate_responses(budget_student, prompts="p.jsonl", out="o.jsonl", prompt="hi")
    with pytest.raises(ValueError, match="--prompts needs --out"):
        generate_responses(budget_student, prompts="p.jsonl")
    with pytest.raises(ValueError, match="exceed"):
        generate_responses(budget_student, prompt="word " * 400)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        generate_text(object(), "hi")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes(open(f"{budget_student}/{name}", "rb").read())
    with pytest.raises(ValueError, match="no tokenizer files"):
        generate_text(str(no_tok), "hi")


def test_sampling_uses_the_whole_vocabulary_every_eos_and_leaves_the_caller_state(budget_student):
    """Unset, transformers' top_k default (50) would silently truncate stage-1 samples; generation must stop at every
    eos id; the caller's tokenizer padding and random state are not changed."""
    import torch

    from zeda_lightning.sampling import eos_token_ids, generate_text, load_for_generation

    lm, tok = load_for_generation(budget_student)
    tok.padding_side = "right"
    lm.generation_config.eos_token_id = [tok.eos_token_id, 5]
    seen = {}

    def fake_generate(**kwargs):
        seen.update(kwargs.pop("generation_config").to_dict(), **kwargs)  # the settings travel as one config
        return kwargs["input_ids"]

    lm.generate = fake_generate
    torch.manual_seed(123)
    expected_next = torch.rand(())
    torch.manual_seed(123)
    generate_text(lm, "12 + 30 =", tok, temperature=1.0, seed=7)
    assert seen["top_k"] == 0 and seen["do_sample"] is True
    assert seen["eos_token_id"] == eos_token_ids(lm, tok) == [tok.eos_token_id, 5]
    assert tok.padding_side == "right"
    assert torch.equal(torch.rand(()), expected_next)  # the sampler's seed did not reset the global generator
    generate_text(lm, "12 + 30 =", tok, temperature=1.0, top_k=20)
    assert seen["top_k"] == 20


def test_generate_zero_ratio_is_the_share_of_skipped_slots_over_prefill_and_decode():
    """Records are per layer and per forward (a prefill of many tokens, then one token a step): the ratio counts
    every (token, slot) pair once, as if all forwards were one."""
    import torch

    from zeda_lightning.generate import _zero_ratio
    from zeda_lightning.routing import RouterOutput

    def out(selected):
        selected = torch.tensor(selected)
        zeros = torch.zeros(selected.shape)
        return RouterOutput(zeros, zeros, selected, selected, num_experts=4, score_func="softmax")

    # two layers; prefill of 3 tokens, then two decode steps; K = 2; ids >= 4 are skipped slots
    rec = {0: [out([[0, 4], [1, 2], [5, 6]]), out([[4, 5]]), out([[0, 1]])],
           1: [out([[0, 1], [1, 2], [3, 0]]), out([[0, 7]]), out([[4, 1]])]}
    flat = torch.cat([o.skipped.flatten() for outs in rec.values() for o in outs]).float()
    assert _zero_ratio(rec) == round(float(flat.mean()), 4) == round(7 / 20, 4)
