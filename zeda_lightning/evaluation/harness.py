"""lm-evaluation-harness on a zeda export: the registered ``zeda`` model and ``python -m zeda_lightning eval``.

``ZedaLM`` is lm-eval's ``HFLM`` with one change: the model is built by :func:`zeda_lightning.from_pretrained`, so an
export comes back with its injected routers and compute budget (no remote code, no pickle), and skipped slots save
compute during scoring and generation. Everything else (batching, log-likelihoods, generation, chat templates) is
lm-eval's own.

    python -m zeda_lightning eval --model runs/tiny/student --tasks zeda_tiny_continuation \
        --include_path tests/evaluation/tasks
    lm_eval.simple_evaluate(model="zeda", model_args={"pretrained": DIR}, ...)   # after importing this module
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import tempfile
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from zeda_lightning.export import check_model_dir, from_pretrained
from zeda_lightning.fsio import atomic_write
from zeda_lightning.serving import check_servable, require_vllm_python, vllm_env

BACKENDS = ("hf", "vllm")


@register_model("zeda")
class ZedaLM(HFLM):
    """lm-eval model for zeda exports (and plain transformers MoE directories, for the teacher side)."""

    def __init__(self, pretrained: str, device: str | None = None, **kwargs: Any) -> None:
        if not isinstance(pretrained, str):
            raise ValueError("the zeda lm-eval model takes a directory: model_args={'pretrained': 'path/to/export'}")
        check_model_dir(pretrained, require_tokenizer=True)  # clear errors before lm-eval touches it
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=pretrained, device=device, **kwargs)

    def _create_model(self, pretrained: str, dtype: str | torch.dtype | None = "auto", **kwargs: Any) -> None:
        from lm_eval.models.utils_hf import get_dtype

        self._model = from_pretrained(pretrained, dtype=torch.float32 if dtype in ("auto", None) else get_dtype(dtype))


def evaluate(
    model: str,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    seed: int = 0,
    backend: str = "hf",
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on a model directory; returns lm-eval's results dict (``results``, ``configs``, ...)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}; pass --backend hf or vllm")
    check_model_dir(model, require_tokenizer=True)
    if include_path is not None and not os.path.isdir(include_path):
        raise ValueError(f"include_path {include_path} is not a directory of lm-eval task YAML files")
    if backend == "vllm":
        return _evaluate_vllm(model, tasks, include_path, limit, batch_size, num_fewshot, seed)
    # indexing lm-eval's thousands of built-in YAMLs takes a while: try the local tasks alone first
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks {unknown}; local tasks need --include_path DIR with their YAML")
    return lm_eval.simple_evaluate(
        model="zeda",
        model_args={"pretrained": model, "batch_size": batch_size},
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=0,
        log_samples=False,
    )


def _evaluate_vllm(model: str, tasks: list[str], include_path: str | None, limit: int | None, batch_size: int,
                   num_fewshot: int | None, seed: int) -> dict[str, Any]:
    """lm-eval's own ``vllm`` backend, run by lm-eval's command line in the vLLM environment
    (:mod:`zeda_lightning.serving.lm_eval_vllm`; ``scripts/vllm_env.sh`` installs lm_eval there); vLLM resolves
    the export's architecture to the zeda plugin, so zero slots are skipped while scoring."""
    cfg = check_servable(model)
    python = require_vllm_python()
    model_args = (f"pretrained={os.path.abspath(model)},dtype=float32,enforce_eager=True,seed={seed},"
                  f"max_model_len={int(cfg.get('max_position_embeddings', 2048))},kv_cache_memory_bytes={256 << 20}")
    with tempfile.TemporaryDirectory(prefix="zeda-lm-eval-") as tmp:
        cmd = [python, "-m", "zeda_lightning.serving.lm_eval_vllm", "--model", "vllm", "--model_args", model_args,
               "--tasks", ",".join(tasks), "--batch_size", str(batch_size), "--seed", str(seed), "--output_path", tmp]
        cmd += ["--include_path", os.path.abspath(include_path)] if include_path else []
        cmd += ["--limit", str(limit)] if limit is not None else []
        cmd += ["--num_fewshot", str(num_fewshot)] if num_fewshot is not None else []
        proc = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True)
        found = sorted(glob.glob(os.path.join(tmp, "**", "results_*.json"), recursive=True))
        if proc.returncode != 0 or not found:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"lm-eval on vLLM failed (exit {proc.returncode}): {tail[-600:]}")
        with open(found[-1]) as f:
            return json.load(f)


def eval_main(
    model: str,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    out: str | None = None,
    seed: int = 0,
    backend: str = "hf",
) -> dict[str, Any]:
    """Evaluate a zeda export (or any transformers MoE directory) with lm-evaluation-harness.

    Args:
        model: model directory with tokenizer.
        tasks: lm-eval task names, e.g. ``[zeda_tiny_continuation]``.
        include_path: directory of extra task YAML files (e.g. ``tests/evaluation/tasks``).
        limit: evaluate only the first N documents of each task.
        batch_size: sequences per forward.
        num_fewshot: few-shot examples (task default if unset).
        out: write lm-eval's full results JSON here (atomically).
        seed: seed for lm-eval's samplers.
        backend: ``hf`` (transformers, the registered ``zeda`` model) or ``vllm`` (lm-eval's vLLM backend in the
            vLLM environment, serving a zeda export through the plugin).
    """
    if out is not None and os.path.exists(out):
        raise ValueError(f"{out} exists; remove it or pick another --out")
    results = evaluate(model, tasks, include_path, limit, batch_size, num_fewshot, seed, backend)
    summary = {
        task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
        for task, metrics in results["results"].items()
    }
    if out is not None:
        with atomic_write(out) as f:
            json.dump(results, f, indent=2, default=str)
    return {"model": model, "results": summary}
