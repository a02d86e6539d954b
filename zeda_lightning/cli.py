"""``python -m zeda_lightning <subcommand>``: one command line, every subcommand listed by ``--help``.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI (:class:`ZedaCLI`): the YAML picks the module, the
data module and the routing variant by ``class_path``. Every other subcommand is a plain typed function of the
library (``generate_responses``, ``budget_main``, ...) registered in :data:`SUBCOMMANDS`, and its parser is built one
way: jsonargparse's ``ArgumentParser.add_function_arguments`` on the function's signature (``--name`` per
parameter, its type and default) and docstring (the first line is the subcommand's one-line help, ``Args`` the
flags' help). ``estimate`` adds its flags to fit's own parser instead (:class:`ZedaConfigCLI`), so the config it
reads is the one ``fit`` would run. The command's return value is printed: a JSON line (a path as it is).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.cli import LightningCLI

from zeda_lightning.budget import budget_main
from zeda_lightning.checkpointing import make_checkpoints_atomic
from zeda_lightning.data.corpus import corpus_main
from zeda_lightning.data.module import ZedaDataModule
from zeda_lightning.data.tokenizer import tokenizer_main
from zeda_lightning.demo import demo_main
from zeda_lightning.estimate import estimate_main
from zeda_lightning.generate import generate_responses
from zeda_lightning.modules.base import TrainModuleBase
from zeda_lightning.runlock import RunLock, launching_process
from zeda_lightning.sharding import consolidate_main
from zeda_lightning.slices import slice_main

PROG = "python -m zeda_lightning"

#: ZedaCLI's settings: the Lightning subcommands and estimate's config-only parse use the same
CLI_SETTINGS: dict[str, Any] = {
    "model_class": TrainModuleBase,
    "datamodule_class": ZedaDataModule,
    "subclass_mode_model": True,
    "subclass_mode_data": True,
    "save_config_kwargs": {"overwrite": True},
}


class ZedaCLI(LightningCLI):
    """LightningCLI with checks before the trainer writes anything (config, logs, checkpoints), atomic checkpoints,
    one run per output directory, and checkpoints that restore state but never configure the run."""

    def _parse_ckpt_path(self) -> None:
        """LightningCLI merges a checkpoint's hyperparameters into the config and instantiates what they name
        (``optimizer: {class_path: os.system}`` would run). Here the user's YAML and flags decide what runs; a
        checkpoint only restores state, after :meth:`TrainModuleBase.check_resume` accepted it."""

    def _preflight(self) -> None:
        sub = self.subcommand
        self.model.preflight(self.datamodule)
        ckpt_path = self.config[sub].get("ckpt_path")
        resolved = self.model.check_run(self.trainer, self.datamodule, ckpt_path, stage=sub)
        if ckpt_path is not None:
            self.config_init[sub]["ckpt_path"] = resolved
        if "weights_only" in self.config_init[sub]:
            self.config_init[sub]["weights_only"] = True
        make_checkpoints_atomic(self.trainer)
        if sub == "fit" and launching_process():
            self._lock = RunLock().acquire(self.model.output_dirs(self.trainer))

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:
            lock = getattr(self, "_lock", None)
            if lock is not None:
                lock.release()

    def before_fit(self) -> None:
        self._preflight()

    def before_validate(self) -> None:
        self._preflight()

    def before_test(self) -> None:
        self._preflight()

    def before_predict(self) -> None:
        self._preflight()


class ZedaConfigCLI(ZedaCLI):
    """ZedaCLI's parser (fit's, without the subcommand), parsed only: ``--config YAML`` and overrides such as
    ``--model.init_args.teacher DIR`` resolve exactly as for ``fit``, defaults come from the classes' signatures,
    and nothing is instantiated, seeded or run (no weight is read). ``command``'s own flags (its parameters but
    ``config``) are added from its signature; ``self.config`` is the parsed namespace."""

    def __init__(self, args: list[str], command: Callable | None = None, prog: str = PROG,
                 description: str | None = None) -> None:
        self._command = command
        super().__init__(**CLI_SETTINGS, args=args, run=False,
                         parser_kwargs={"prog": prog, "description": description})

    def add_arguments_to_parser(self, parser) -> None:
        if self._command is not None:
            parser.add_function_arguments(self._command, as_group=False, skip={"config"})

    def parse_arguments(self, parser, args) -> None:
        self.config = parser.parse_args(args)  # (LightningCLI's warns when sys.argv is set too, as it is here)

    def _set_seed(self) -> None:
        """Nothing is sampled."""

    def instantiate_classes(self) -> None:
        """The config only: no model, data module or trainer is built."""


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: a typed function of the library, or a LightningCLI one (``command=None``)."""

    #: the function that is the subcommand; ``"module:function"`` is imported when used (an optional dependency)
    command: Callable | str | None
    #: the one-line help of a LightningCLI subcommand (a function's is its docstring's first line)
    help: str = ""
    #: parsed on fit's parser (``--config YAML`` + overrides); the resolved config is passed as ``config``
    reads_config: bool = False


#: every subcommand of ``python -m zeda_lightning``, in ``--help`` order
SUBCOMMANDS: dict[str, Subcommand] = {
    "fit": Subcommand(None, "Distil (or pretrain) the YAML's module on its data module (LightningCLI: --config YAML)."),
    "validate": Subcommand(None, "Run the YAML's module once over its validation data (LightningCLI)."),
    "test": Subcommand(None, "Run the YAML's module once over its test data (LightningCLI)."),
    "predict": Subcommand(None, "Run the YAML's module's predict step over its data (LightningCLI)."),
    "generate": Subcommand(generate_responses),
    "budget": Subcommand(budget_main),
    "eval": Subcommand("zeda_lightning.evaluation.harness:eval_main"),  # lm_eval: optional, seconds to import
    "estimate": Subcommand(estimate_main, reads_config=True),
    "consolidate": Subcommand(consolidate_main),
    "demo": Subcommand(demo_main),
    "slice": Subcommand(slice_main),
    "corpus": Subcommand(corpus_main),
    "tokenizer": Subcommand(tokenizer_main),
}


def _function(name: str) -> Callable:
    target = SUBCOMMANDS[name].command
    if not isinstance(target, str):
        return target
    module, attr = target.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise SystemExit(f"{PROG} {name} needs {err.name or 'an optional package'}: pip install -e \".[eval]\"") from err


def _docstring(name: str) -> str:
    """The command's docstring; a ``"module:function"`` one is read from the source, without importing it."""
    target = SUBCOMMANDS[name].command
    if not isinstance(target, str):
        return inspect.getdoc(target) or ""
    module, attr = target.split(":")
    with open(importlib.util.find_spec(module).origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == attr]
    return ast.get_docstring(fn) or ""


def summary(name: str) -> str:
    """The one-line help of a subcommand."""
    sub = SUBCOMMANDS[name]
    return sub.help if sub.command is None else (_docstring(name).splitlines() or [""])[0]


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    return "\n".join([
        f"usage: {PROG} <subcommand> [flags]",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {summary(name)}" for name in SUBCOMMANDS),
        "",
        f"{PROG} <subcommand> --help lists the subcommand's flags.",
    ]) + "\n"


def _old_spellings(fn: Callable, argv: list[str]) -> list[str]:
    """Spellings the earlier argparse parsers took, kept: dashes in a flag name (``--zero-logit-bias`` is
    ``--zero_logit_bias``) and a bare boolean flag (``--overwrite`` is ``--overwrite true``)."""
    params = inspect.signature(fn).parameters
    hints = typing.get_type_hints(fn)
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            if "-" in name and name.replace("-", "_") in params:
                name = name.replace("-", "_")
                arg = f"--{name}{eq}{value}"
            if not eq and hints.get(name) is bool and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
                out += [arg, "true"]
                continue
        out.append(arg)
    return out


def parse(name: str, argv: list[str]) -> tuple[Callable, dict[str, Any]]:
    """The function of subcommand ``name`` and its keyword arguments parsed from ``argv`` (``--help`` exits)."""
    fn = _function(name)
    argv = _old_spellings(fn, argv)
    prog, description = f"{PROG} {name}", _docstring(name).split("\nArgs:")[0].strip()
    params = [p for p in inspect.signature(fn).parameters if p != "config"]
    if SUBCOMMANDS[name].reads_config:
        config = ZedaConfigCLI(argv, fn, prog=prog, description=description).config.as_dict()
        kwargs = {p: config.pop(p) for p in params}
        return fn, {"config": config, **kwargs}
    parser = ArgumentParser(prog=prog, description=description, default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these flags' values")
    parser.add_function_arguments(fn, as_group=False, as_positional=False)
    cfg = parser.parse_args(argv)
    return fn, {p: cfg[p] for p in params}


def cli_main(args: list[str] | None = None, run: bool = True) -> ZedaCLI:
    return ZedaCLI(**CLI_SETTINGS, args=args, run=run)


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write(usage())
        return
    if not argv or (argv[0] not in SUBCOMMANDS and not argv[0].startswith("-")):
        sys.stderr.write(usage() + (f"error: unknown subcommand {argv[0]!r}\n" if argv else
                                    "error: a subcommand is required\n"))
        raise SystemExit(2)
    sub = SUBCOMMANDS.get(argv[0])
    if sub is None or sub.command is None:
        cli_main(None if from_command_line else argv)
        return
    fn, kwargs = parse(argv[0], argv[1:])
    result = fn(**kwargs)
    print(result if isinstance(result, str) else json.dumps(result, ensure_ascii=False))
