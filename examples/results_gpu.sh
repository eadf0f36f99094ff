#!/usr/bin/env bash
# The GPU runs behind docs/results.md, as sent through the device tool (one H200; see docs/results.md).
# The 98 MB GGUF cannot travel in one call (64 MiB limit), so it is split here and reassembled there:
#   here:   split -b 52000000 <SmolLM2 .gguf> .dev/smollm2.gguf.part_   (.dev/ is git-ignored)
#   call 1: carry .dev/smollm2.gguf.part_aa and .dev/gguf-*.whl;  bash examples/results_gpu.sh stage
#   call 2: carry .dev/smollm2.gguf.part_ab;                        bash examples/results_gpu.sh main
#   call 3: (model already there)                                   bash examples/results_gpu.sh extra
# Outputs go to $OUT/results.tar.gz (CSV, PNG, logs).
set -uo pipefail
STAGE=/tmp/ppa_model
mkdir -p "$STAGE"
case "${1:-}" in
  stage)
    cp .dev/smollm2.gguf.part_aa .dev/gguf-*.whl "$STAGE"/ && ls -la "$STAGE" && nvidia-smi -L
    exit 0 ;;
esac
[ -f .dev/smollm2.gguf.part_ab ] && cp .dev/smollm2.gguf.part_ab "$STAGE"/
if [ ! -f "$STAGE/smollm2.gguf" ]; then cat "$STAGE"/smollm2.gguf.part_aa "$STAGE"/smollm2.gguf.part_ab > "$STAGE/smollm2.gguf"; fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STAGE"/gguf-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PPA_HF_DEFAULT_GGUF="$STAGE/smollm2.gguf" PYTHONUNBUFFERED=1
R=/tmp/ppa_results; mkdir -p "$R"
python3 -c "import torch, transformers; print(torch.cuda.get_device_name(), torch.__version__, transformers.__version__)" | tee "$R/machine.txt"
git log -1 --format=%H >> "$R/machine.txt" 2>/dev/null; date -u >> "$R/machine.txt"
S=$(date +%s)
case "${1:-}" in
  main)
    python3 examples/results.py zeroshot --out-dir "$R" --backend naive --tokens 16384 \
      --ps 0 0.25 0.5 0.625 0.75 0.875 1 --sinks 0 4 --contexts 2048 8192 --texts pydoc stdlib 2>&1 | tee "$R/zeroshot.log"
    echo "zeroshot wall: $(( $(date +%s) - S )) s" | tee -a "$R/machine.txt"
    python3 examples/results.py scurve --out-dir "$R" --backend naive --ps 0 0.25 0.5 0.625 0.75 0.875 1 \
      --seeds 0 --knee 0.625 0.75 --knee-seeds 1 --steps 100 --context 2048 --batch-size 8 --lr 1e-4 \
      --eval-samples 100 --eval-batch 50 --ppl-windows 8 --gsm8k-limit 64 --gsm8k-max-new-tokens 160 \
      --data-dir "$PWD/.dev/data" 2>&1 | tee "$R/scurve.log"
    echo "main wall: $(( $(date +%s) - S )) s" | tee -a "$R/machine.txt" ;;
  extra)
    python3 examples/results.py zeroshot --out-dir "$R" --backend naive --tokens 16384 --ps 0.25 0.5 \
      --sinks 1 16 --contexts 8192 --texts pydoc stdlib 2>&1 | tee "$R/sinks.log"
    python3 examples/results.py zeroshot --out-dir "$R" --backend naive --tokens 16384 \
      --ps 0 0.25 0.5 0.625 0.75 0.875 1 --sinks 0 --contexts 2048 8192 --texts pydoc --granularities block 2>&1 | tee "$R/block_zeroshot.log"
    python3 examples/results.py scurve --out-dir "$R" --backend naive --granularity block --ps 0.5 0.75 0.875 \
      --seeds 0 --steps 100 --context 2048 --batch-size 8 --lr 1e-4 --eval-samples 100 --eval-batch 50 \
      --ppl-windows 8 --gsm8k-limit 0 --data-dir "$PWD/.dev/data" 2>&1 | tee "$R/block_scurve.log"
    echo "extra wall: $(( $(date +%s) - S )) s" | tee -a "$R/machine.txt" ;;
esac
tar -czf "$OUT/results.tar.gz" -C "$R" .
ls -la "$R"
