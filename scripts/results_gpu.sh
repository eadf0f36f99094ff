#!/usr/bin/env bash
# `make results-gpu`: the runs behind docs/results.md on one CUDA GPU, with the embedded SmolLM2-135M-Instruct.
# Writes to $OUT: zeroshot.csv, scurve.csv and their plots (examples/results.py appends each finished row, so a
# re-run into the same folder skips what is done), one log per run, timings.txt, machine.txt.
source "$(dirname "$0")/gpu_common.sh"
start "make results-gpu" 1

RESULTS=("$PYTHON" examples/results.py)
PS=(0 0.25 0.5 0.625 0.75 0.875 1)
SCURVE=(--backend naive --steps 100 --context 2048 --batch-size 8 --lr 1e-4 --eval-samples 100 --eval-batch 50
        --ppl-windows 8 --data-dir "$DATA")

# 1. zero-shot perplexity: token pattern, 0 and 4 sinks, 2k and 8k context, two texts
step zeroshot "${RESULTS[@]}" zeroshot --out-dir "$OUT" --backend naive --tokens 16384 --ps "${PS[@]}" \
  --sinks 0 4 --contexts 2048 8192 --texts pydoc stdlib
# 2. the fine-tuned S-curve (passkey retrieval), a second seed at the two knee points, GSM8K 4-shot on 64 problems
step scurve "${RESULTS[@]}" scurve --out-dir "$OUT" --ps "${PS[@]}" --seeds 0 --knee 0.625 0.75 --knee-seeds 1 \
  "${SCURVE[@]}" --gsm8k-limit 64 --gsm8k-max-new-tokens 160
# 3. sinks 1 and 16
step sinks "${RESULTS[@]}" zeroshot --out-dir "$OUT" --backend naive --tokens 16384 --ps 0.25 0.5 --sinks 1 16 \
  --contexts 8192 --texts pydoc stdlib
# 4. block granularity, zero-shot and fine-tuned
step block_zeroshot "${RESULTS[@]}" zeroshot --out-dir "$OUT" --backend naive --tokens 16384 --ps "${PS[@]}" \
  --sinks 0 --contexts 2048 8192 --texts pydoc --granularities block
step block_scurve "${RESULTS[@]}" scurve --out-dir "$OUT" --granularity block --ps 0.5 0.75 0.875 --seeds 0 \
  "${SCURVE[@]}" --gsm8k-limit 0

finish
