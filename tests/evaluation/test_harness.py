"""lm-evaluation-harness through the registered ``zeda`` model on the shipped local task (no downloads)."""

import json
import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from zeda_lightning.cli import main as cli_entry  # noqa: E402
from zeda_lightning.evaluation import harness  # noqa: E402,F401  (registers "zeda")
from tests.helpers import single_thread  # noqa: F401  (autouse: one intra-op thread)

TASKS = os.path.join(os.path.dirname(__file__), "tasks")
TASK = "zeda_tiny_continuation"


@pytest.fixture(scope="module")
def zeda_export(tmp_path_factory, tiny_teacher):
    from tests.helpers import export_zero_expert_student

    return export_zero_expert_student(tiny_teacher, str(tmp_path_factory.mktemp("eval") / "student"), 1.0)


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log-probs of the continuation tokens, tokenised as lm-eval's HFLM does (trailing context whitespace
    moved into the continuation, continuation = tokens of the whole past those of the context, the left cut to the
    model's context length)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_cont = len(whole) - len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole[-(model.config.max_position_embeddings + 1) :]])
    with torch.no_grad():
        logp = model(ids[:, :-1]).logits.float().log_softmax(-1)[0]  # (S-1, V)
    return logp[-n_cont:].gather(1, ids[0, -n_cont:, None]).sum().item()


def test_simple_evaluate_on_local_task_matches_direct_loglikelihoods(zeda_export):
    from transformers import AutoTokenizer

    from zeda_lightning.export import from_pretrained

    out = lm_eval.simple_evaluate(
        model="zeda", model_args={"pretrained": zeda_export, "batch_size": 4}, tasks=[TASK],
        task_manager=TaskManager(include_path=TASKS, include_defaults=False), limit=6, log_samples=True, bootstrap_iters=0,
    )
    samples = out["samples"][TASK]
    assert len(samples) == 6 and out["results"][TASK]["sample_len"] == 6
    model, tok = from_pretrained(zeda_export), AutoTokenizer.from_pretrained(zeda_export)
    assert model.config.zeda_budget["zero_logit_bias"][0] == 1.0  # the wrapper's model is the export as saved
    correct = 0
    for s in samples:
        doc = s["doc"]
        mine = [_loglikelihood(model, tok, doc["context"], c) for c in doc["choices"]]
        theirs = [r[0] for r in s["filtered_resps"]]
        assert theirs == pytest.approx(mine, abs=1e-3)
        correct += int(max(range(len(mine)), key=mine.__getitem__) == doc["gold"])
    assert out["results"][TASK]["acc,none"] == pytest.approx(correct / len(samples))


def test_eval_cli_prints_metrics_and_writes_results(tmp_path, zeda_export, tiny_teacher, capsys):
    out = tmp_path / "results.json"
    cli_entry(["eval", "--model", zeda_export, "--tasks", f"[{TASK}]", "--include_path", TASKS, "--limit", "2",
               "--out", str(out)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= summary["results"][TASK]["acc"] <= 1.0
    assert json.loads(out.read_text())["results"][TASK]["acc,none"] == summary["results"][TASK]["acc"]
    with pytest.raises(ValueError, match="exists; remove it"):
        cli_entry(["eval", "--model", zeda_export, "--tasks", f"[{TASK}]", "--include_path", TASKS, "--out", str(out)])
    with pytest.raises(ValueError, match="not a directory of lm-eval task YAML"):
        cli_entry(["eval", "--model", zeda_export, "--tasks", f"[{TASK}]", "--include_path", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="model directory not found"):
        cli_entry(["eval", "--model", str(tmp_path / "none"), "--tasks", f"[{TASK}]", "--include_path", TASKS])


def test_shipped_task_is_well_formed():
    rows = [json.loads(line) for line in open(os.path.join(TASKS, f"{TASK}.jsonl"))]
    assert len(rows) == 90 and {r["domain"] for r in rows} == {"code", "prose", "math"}
    for r in rows:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["gold"] < 4
