"""The package's layering: the import-linter contracts in pyproject.toml hold, nothing inside the package imports
through ``zeda_lightning/__init__``, and no import of the package's own modules hides inside a function (a hidden
import is how a cycle creeps back in)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "zeda_lightning"
#: third-party modules imported lazily on purpose: optional extras, or heavy ones only one command needs
OPTIONAL = {"lm_eval", "matplotlib", "vllm", "zstandard"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def test_import_linter_contracts_hold():
    lint = pathlib.Path(sys.executable).with_name("lint-imports")  # import-linter's command, from the test extra
    proc = subprocess.run([str(lint), "--no-cache"], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_nothing_imports_through_the_package_root():
    offenders = []
    for path, tree in _modules():
        if path == PACKAGE / "__init__.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "zeda_lightning" and node.level == 0:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
            if isinstance(node, ast.Import) and any(a.name == "zeda_lightning" for a in node.names):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, f"import from the defining module, not the package root: {offenders}"


def test_no_function_local_imports():
    offenders = []
    for path, tree in _modules():
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                if any(n.split(".")[0] not in OPTIONAL for n in names):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {names[0]}")
    assert not offenders, f"imports belong at the top of the module (optional extras excepted): {offenders}"
