"""A vLLM engine that lives beside a training run: stage-2 rollouts sampled by vLLM from the student's current
weights.

vLLM pins an older transformers than this package, so the engine runs in the vLLM environment as one long-lived
subprocess (:mod:`zeda_lightning.serving.engine_worker`) on the same machine and devices as the trainer, as
co-located rollout engines do. It starts once from an export of the student; before each rollout the trainer writes
the student's weights in the published layout (``save_pretrained``, into ``/dev/shm`` where there is one) and the
engine loads them in place, so every rollout samples the policy being trained. The engine records no expert
choices, so rollouts it samples are trained without routing replay.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
import weakref

from torch import nn

from zeda_lightning.export import export_model
from zeda_lightning.serving import check_servable, require_vllm_python, vllm_env


def _scratch_root() -> str | None:
    """Where weights are handed over: memory-backed ``/dev/shm`` when it exists, else the system's temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class VllmEngine:
    """One vLLM engine in the vLLM environment, serving a zeda model whose weights follow a live module.

    ``VllmEngine.for_model(student, tokenizer, ...)`` exports ``student`` to a scratch directory and starts the
    engine on it; :meth:`load_weights` hands it a module's current weights; :meth:`generate` samples. Close it (or
    use it as a context manager); a finaliser kills the subprocess if the trainer forgets.
    """

    def __init__(self, model_dir: str, *, dtype: str = "float32", max_model_len: int = 2048,
                 kv_cache_memory_bytes: int = 256 << 20, max_num_seqs: int = 64, seed: int = 0,
                 start_timeout: float = 900.0, scratch: str | None = None) -> None:
        check_servable(model_dir)
        python = require_vllm_python()
        self.model_dir = model_dir
        self._scratch = scratch
        self._log = tempfile.NamedTemporaryFile(prefix="zeda-vllm-engine-", suffix=".log", delete=False)
        self._proc = subprocess.Popen([python, "-m", "zeda_lightning.serving.engine_worker"], env=vllm_env(),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self._finalizer = weakref.finalize(self, _kill, self._proc, scratch)
        atexit.register(self._finalizer)
        self.start_seconds = self._call({"op": "start", "model": model_dir, "dtype": dtype,
                                         "max_model_len": max_model_len, "seed": seed, "max_num_seqs": max_num_seqs,
                                         "kv_cache_memory_bytes": kv_cache_memory_bytes}, start_timeout)["seconds"]

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer, **kwargs) -> VllmEngine:
        """Export ``model`` (a zeda student) to a scratch directory and start an engine on it."""
        scratch = tempfile.mkdtemp(prefix="zeda-rollout-", dir=_scratch_root())
        try:
            model_dir = export_model(model, os.path.join(scratch, "model"), tokenizer)
            return cls(model_dir, scratch=scratch, **kwargs)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def _call(self, request: dict, timeout: float | None = None) -> dict:
        if self._proc.poll() is not None:
            raise RuntimeError(f"the vLLM engine exited ({self._proc.returncode}): {self._log_tail()}")
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"the vLLM engine did not answer {request['op']!r} within {timeout:.0f} s: "
                               f"{self._log_tail()}")
        line = self._proc.stdout.readline()  # the worker answers every request with exactly one line
        if not line:
            raise RuntimeError(f"the vLLM engine stopped during {request['op']!r}: {self._log_tail()}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"the vLLM engine refused {request['op']!r}: {reply.get('error')}")
        return reply

    def _log_tail(self) -> str:
        with open(self._log.name, errors="replace") as f:
            lines = f.read().strip().splitlines()
        return " | ".join(lines[-4:])[-800:] + f" (log: {self._log.name})"

    def load_weights(self, model: nn.Module) -> dict:
        """Hand ``model``'s current weights to the engine: written as ``save_pretrained`` writes them (the family's
        checkpoint names), loaded in place by vLLM, then deleted. Returns ``{"tensors", "seconds"}``."""
        start = time.perf_counter()
        staging = tempfile.mkdtemp(prefix="zeda-weights-", dir=self._scratch or _scratch_root())
        try:
            model.save_pretrained(staging, safe_serialization=True)
            reply = self._call({"op": "load_weights", "path": staging})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {"tensors": reply["tensors"], "seconds": time.perf_counter() - start}

    def generate(self, prompt_token_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, top_k: int = 0, num_samples: int = 1, eos_token_ids: list[int] = (),
                 seed: int | None = None) -> dict:
        """``{"token_ids": [prompt][sample] -> generated ids (EOS included), "seconds", "slots", "zero_slots"}``."""
        return self._call({"op": "generate", "prompt_token_ids": prompt_token_ids, "max_new_tokens": max_new_tokens,
                           "temperature": temperature, "top_p": top_p, "top_k": top_k, "num_samples": num_samples,
                           "eos_token_ids": list(eos_token_ids), "seed": seed})

    def close(self) -> None:
        """Stop the engine and remove the scratch directory this engine made."""
        if self._proc.poll() is None:
            try:
                self._call({"op": "close"}, 60)
                self._proc.wait(timeout=60)
            except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError):
                pass
        self._finalizer()
        if self._proc.returncode == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._log.name)  # kept when the engine failed: errors name it

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill(proc: subprocess.Popen, scratch: str | None) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


__all__ = ["VllmEngine"]
