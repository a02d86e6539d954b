"""The command line reports bad input in one line (exit 2) instead of a traceback, and unwraps jsonargparse."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "zeda_lightning", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_bad_input_is_one_line_naming_the_fix_and_exit_2(tmp_path):
    out = tmp_path / "budget"
    proc = _run("budget", "--model", "assets/tiny_teacher", "--target", "1.2", "--calibration",
                "data/tiny_corpus/val.jsonl.gz", "--heldout", "data/tiny_corpus/test.jsonl.gz", "--out", str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "zeda_lightning: error: budget target (zero-slot ratio) must be in [0, 1), got 1.2" in proc.stderr
    assert "Traceback" not in proc.stderr and "budget.py:" in proc.stderr
    assert not out.exists()
    proc = _run("budget", "--model", "assets/tiny_teacher", "--target", "1.2", "--calibration", "x", "--heldout", "y",
                "--out", str(out), env={"ZEDA_TRACEBACK": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError: budget target" in proc.stderr


def test_fit_reports_the_check_that_jsonargparse_wraps(tmp_path):
    root = tmp_path / "run"
    proc = _run("fit", "--config", "configs/tiny.yaml", "--model.init_args.teacher", str(tmp_path / "missing"),
                "--trainer.default_root_dir", str(root))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("zeda_lightning: error:")]
    assert lines == [f"zeda_lightning: error: model directory not found: {tmp_path / 'missing'}"]
    assert "Union subtypes" not in proc.stderr and not root.exists()


# -- one command line: every subcommand discoverable ----------------------------------------------------------------
SUBCOMMANDS = ["fit", "validate", "test", "predict", "generate", "budget", "eval", "estimate", "consolidate", "demo",
               "slice", "corpus", "tokenizer"]


def _listing(text: str) -> dict[str, str]:
    """``{subcommand: its one-line description}`` from the top-level help."""
    rows = [line.split(None, 1) for line in text.splitlines() if line.startswith("  ") and len(line.split()) > 1]
    return {name: rest.strip() for name, rest in rows if name in SUBCOMMANDS}


def test_help_lists_every_subcommand_with_a_one_line_description():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = _listing(proc.stdout)
    assert list(listed) == SUBCOMMANDS, proc.stdout
    assert all(len(text) > 20 and text.endswith(".") for text in listed.values()), listed
    assert "python -m zeda_lightning <subcommand> --help" in proc.stdout


def test_short_help_and_no_arguments_list_them_too(capsys):
    from zeda_lightning.cli import main as cli_entry

    cli_entry(["-h"])
    assert list(_listing(capsys.readouterr().out)) == SUBCOMMANDS
    for argv, says in (([], "a subcommand is required"), (["generat"], "unknown subcommand 'generat'")):
        with pytest.raises(SystemExit) as err:
            cli_entry(argv)
        err_text = capsys.readouterr().err
        assert err.value.code == 2 and says in err_text and list(_listing(err_text)) == SUBCOMMANDS


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_help_exits_0(sub, capsys):
    from zeda_lightning.cli import main as cli_entry

    with pytest.raises(SystemExit) as err:
        cli_entry([sub, "--help"])
    out = capsys.readouterr().out
    assert err.value.code == 0 and out.startswith("usage:") and "--help" in out


@pytest.mark.parametrize("sub, flags", [
    ("generate", ["--model", "--prompts", "--out", "--prompt", "--max_new_tokens", "--temperature", "--top_p",
                  "--top_k", "--num_samples", "--batch_size", "--max_prompt_tokens", "--seed", "--overwrite", "--config"]),
    ("budget", ["--model", "--target", "--calibration", "--out", "--heldout", "--mode", "--block_size",
                "--calibration_blocks", "--heldout_blocks", "--overwrite", "--config"]),
    ("eval", ["--model", "--tasks", "--include_path", "--limit", "--batch_size", "--num_fewshot", "--out", "--seed"]),
    ("estimate", ["--config", "--model_dir", "--devices", "--num_nodes", "--model", "--data", "--trainer.devices"]),
    ("consolidate", ["--ckpt", "--out", "--overwrite"]),
    ("demo", ["--family", "--routing", "--zero_logit_bias"]),
])
def test_subcommand_flags_keep_their_names(sub, flags, capsys):
    from zeda_lightning.cli import main as cli_entry

    with pytest.raises(SystemExit):
        cli_entry([sub, "--help"])
    out = capsys.readouterr().out
    assert [f for f in flags if f + " " not in out and f + "\n" not in out] == []


def test_earlier_spellings_are_still_accepted():
    """argparse took ``--zero-logit-bias`` (demo) and a bare ``--overwrite`` (consolidate)."""
    from zeda_lightning.cli import parse

    _, kwargs = parse("demo", ["--family", "olmoe", "--zero-logit-bias", "0.5"])
    assert kwargs == {"family": "olmoe", "routing": "zero_experts", "zero_logit_bias": 0.5}
    _, kwargs = parse("consolidate", ["--ckpt", "c", "--overwrite", "--out", "o"])
    assert kwargs == {"ckpt": "c", "out": "o", "overwrite": True, "model_dir": None}
    _, kwargs = parse("consolidate", ["--ckpt", "c", "--out", "o", "--overwrite"])
    assert kwargs["overwrite"] is True
    _, kwargs = parse("generate", ["--model", "m", "--prompt", "p", "--overwrite", "false"])
    assert kwargs["overwrite"] is False


def test_demo_runs_from_the_command_line():
    proc = _run("demo", "--family", "olmoe", "--zero-logit-bias", "0.5", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["masked_equals_original"] is True and 0 < result["zero_ratio"] < 1
    proc = _run("demo", "--family", "no_such_family")
    assert proc.returncode == 2 and "no_such_family" in proc.stderr
