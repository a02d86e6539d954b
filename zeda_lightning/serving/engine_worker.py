"""The vLLM side of :class:`zeda_lightning.serving.engine.VllmEngine`: ``python -m
zeda_lightning.serving.engine_worker`` in the vLLM environment, one engine kept up for a whole training run.

Requests are JSON lines on stdin, one JSON reply line each on the process's original stdout (vLLM's own logging and
prints go to stderr). The first request starts the engine (model, dtype, lengths, KV cache bytes, seed); then
``load_weights`` reads every safetensors file of a directory into the running model (the student after an optimiser
step, in the layout ``save_pretrained`` writes), ``generate`` samples token-id prompts, ``close`` ends. The engine
runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the tensors reach vLLM's in-place reload
(``reload_weights``) as they are, with no serialisation.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
import traceback

from safetensors import safe_open
from vllm import LLM
from vllm.platforms import current_platform

from zeda_lightning.serving.plugin import reset_zero_slot_counts
from zeda_lightning.serving.worker import sampling_params, start_engine


def _checkpoint_tensors(directory: str):
    """``(name, tensor)`` of every safetensors file of ``directory`` (the family's checkpoint names)."""
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _prepack_experts_again(model) -> int:
    """vLLM 0.32's CPU fused-MoE prepacks the expert weights into its grouped-GEMM layout on the first load only: an
    in-place reload (a weight update) leaves them in checkpoint layout and the kernel reads garbage. Prepack every
    such layer again after a reload; returns how many."""
    count = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        experts = getattr(getattr(method, "moe_kernel", None), "fused_experts", None)
        if experts is not None and hasattr(module, "w13_weight") and type(experts).__module__.endswith(".cpu_moe"):
            experts.process_weights_after_loading(module)
            count += 1
    return count


def _generate(llm: LLM, req: dict) -> dict:
    params = sampling_params(req, [int(i) for i in req.get("eos_token_ids", [])])
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": ids} for ids in req["prompt_token_ids"]], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    counts = llm.apply_model(reset_zero_slot_counts)[0]
    return {"token_ids": [[list(c.token_ids) for c in out.outputs] for out in outs], "seconds": seconds,
            "slots": counts["slots"], "zero_slots": counts["zero_slots"]}


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # everything else printed goes to the log
    sys.stdout = sys.stderr

    def reply(payload: dict) -> None:
        replies.write(json.dumps(payload) + "\n")

    llm = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            op = req.get("op")
            if llm is None:
                if op != "start":
                    raise ValueError(f"the first request must be 'start', got {op!r}")
                t0 = time.perf_counter()
                llm, zeda = start_engine(req, max_num_seqs=64)
                if not zeda:
                    raise ValueError(f"{req['model']} did not load as a zeda architecture")
                reply({"ok": True, "seconds": time.perf_counter() - t0})
            elif op == "load_weights":
                t0 = time.perf_counter()
                # vLLM's in-place reload: checkpoint-format tensors through the layers' own loaders, then the
                # same post-load processing (CPU fused-MoE repacking) as at start-up
                tensors = list(_checkpoint_tensors(req["path"]))
                llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors),
                                                             "is_checkpoint_format": True})
                if current_platform.is_cpu():
                    llm.apply_model(_prepack_experts_again)
                llm.reset_prefix_cache()
                reply({"ok": True, "tensors": len(tensors), "seconds": time.perf_counter() - t0})
            elif op == "generate":
                reply({"ok": True, **_generate(llm, req)})
            elif op == "close":
                reply({"ok": True})
                break
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as err:  # reported to the trainer, which raises it; the engine stays up for the next one
            traceback.print_exc()
            reply({"ok": False, "error": f"{type(err).__name__}: {err}"})


if __name__ == "__main__":
    main()
