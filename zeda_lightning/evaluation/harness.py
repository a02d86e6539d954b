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

import json
import os
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from zeda_lightning.export import check_model_dir, from_pretrained
from zeda_lightning.fsio import atomic_write


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
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on a model directory; returns lm-eval's results dict (``results``, ``configs``, ...)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    check_model_dir(model, require_tokenizer=True)
    if include_path is not None and not os.path.isdir(include_path):
        raise ValueError(f"include_path {include_path} is not a directory of lm-eval task YAML files")
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


def eval_main(
    model: str,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    out: str | None = None,
    seed: int = 0,
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
    """
    if out is not None and os.path.exists(out):
        raise ValueError(f"{out} exists; remove it or pick another --out")
    results = evaluate(model, tasks, include_path, limit, batch_size, num_fewshot, seed)
    summary = {
        task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
        for task, metrics in results["results"].items()
    }
    if out is not None:
        with atomic_write(out) as f:
            json.dump(results, f, indent=2, default=str)
    return {"model": model, "results": summary}
