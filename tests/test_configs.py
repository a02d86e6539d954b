"""Every shipped YAML parses against the CLI, and --print_config output is itself a valid config."""

import contextlib
import glob
import io
import os

import pytest
import yaml

from zeda_lightning.cli import cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_config_parses_and_round_trips(path, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["class_path"].startswith("zeda_lightning.")
    again = tmp_path / "printed.yaml"
    again.write_text(out.getvalue())
    out2 = io.StringIO()
    with contextlib.redirect_stdout(out2), pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(again), "--print_config"])
    assert yaml.safe_load(out2.getvalue()) == printed
