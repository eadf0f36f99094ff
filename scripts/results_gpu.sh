#!/usr/bin/env bash
# `make results-gpu`: the runs behind docs/results.md on CUDA GPUs, with the embedded SmolLM2-135M-Instruct.
# Writes to $OUT: one log per step, timings.txt, machine.txt (GPU, versions, Python, commit, date) and
#   zeroshot.csv + plots          sections 1, 3 (zero-shot), 4: perplexity of the patched model, no training
#   scurve_runs/                  section 6: the fine-tuned retrieval grid (ppa_hf.recipes.scurve_runs): scurve_runs.csv,
#                                 summary.md, paired_tests.csv, plots, curves/ and prompts/ (one file per run)
#   scurve.csv + plots            sections 2 and 3 (fine-tuned, one seed): only with LEGACY_SCURVE=1
# Every result row is appended as soon as it is finished, so a re-run into the same $OUT skips what is done.
# Environment: SCURVE_SIZE=full (default: every step, the whole grid) | smoke (the reduced grid alone; about 5 min
# on one H200); SCURVE_ARGS: more options for `scurve_runs run` (e.g. "--steps 800 --workers-per-gpu 6");
# PUBLISH=DIR: copy the grid's CSV, summary, paired tests, plots and a tarball of curves/ and prompts/ to DIR
# (docs/results_data for the published figures); PPA_COMMIT: the commit, for code run outside its git checkout.
source "$(dirname "$0")/gpu_common.sh"
start "make results-gpu" 1

SCURVE_SIZE=${SCURVE_SIZE:-full}
LEGACY_SCURVE=${LEGACY_SCURVE:-0}
read -r -a EXTRA <<< "${SCURVE_ARGS:-}"
RESULTS=("$PYTHON" examples/results.py)
PS=(0 0.25 0.5 0.625 0.75 0.875 1)
SCURVE=(--backend naive --steps 100 --context 2048 --batch-size 8 --lr 1e-4 --eval-samples 100 --eval-batch 50
        --ppl-windows 8 --data-dir "$DATA")

case "$SCURVE_SIZE" in
  full) SIZE=() ;;
  smoke) SIZE=(--smoke) ;;
  *) echo "SCURVE_SIZE must be full or smoke, not '$SCURVE_SIZE'" >&2; exit 1 ;;
esac

if [ "$SCURVE_SIZE" = full ]; then
  # 1. zero-shot perplexity: token pattern, 0 and 4 sinks, 2k and 8k context, two texts
  step zeroshot "${RESULTS[@]}" zeroshot --out-dir "$OUT" --backend naive --tokens 16384 --ps "${PS[@]}" \
    --sinks 0 4 --contexts 2048 8192 --texts pydoc stdlib
  # 3. sinks 1 and 16
  step sinks "${RESULTS[@]}" zeroshot --out-dir "$OUT" --backend naive --tokens 16384 --ps 0.25 0.5 --sinks 1 16 \
    --contexts 8192 --texts pydoc stdlib
  # 4. block granularity, zero-shot
  step block_zeroshot "${RESULTS[@]}" zeroshot --out-dir "$OUT" --backend naive --tokens 16384 --ps "${PS[@]}" \
    --sinks 0 --contexts 2048 8192 --texts pydoc --granularities block
fi
if [ "$LEGACY_SCURVE" = 1 ]; then
  # sections 2 and 3 as published: one seed, 100 steps, 100 prompts (superseded by the grid below)
  step scurve "${RESULTS[@]}" scurve --out-dir "$OUT" --ps "${PS[@]}" --seeds 0 --knee 0.625 0.75 --knee-seeds 1 \
    "${SCURVE[@]}" --gsm8k-limit 64 --gsm8k-max-new-tokens 160
  step block_scurve "${RESULTS[@]}" scurve --out-dir "$OUT" --granularity block --ps 0.5 0.75 0.875 --seeds 0 \
    "${SCURVE[@]}" --gsm8k-limit 0
fi
# 6. the fine-tuned retrieval grid: every GPU, several runs per GPU, skips finished runs
step scurve_runs "$PYTHON" -m ppa_hf.recipes.scurve_runs run --out-dir "$OUT/scurve_runs" "${SIZE[@]}" "${EXTRA[@]}"

if [ -n "${PUBLISH:-}" ] && [[ " ${FAILED[*]} " == *" scurve_runs "* ]]; then
  echo "not published to $PUBLISH: the scurve_runs step failed (see $OUT/scurve_runs.log)" >&2
elif [ -n "${PUBLISH:-}" ] && [ -f "$OUT/scurve_runs/scurve_runs.csv" ]; then
  mkdir -p "$PUBLISH"
  cp "$OUT/scurve_runs/scurve_runs.csv" "$OUT/scurve_runs/summary.md" "$PUBLISH/"
  [ -f "$OUT/scurve_runs/paired_tests.csv" ] && cp "$OUT/scurve_runs/paired_tests.csv" "$PUBLISH/"
  cp "$OUT/scurve_runs/"*.png "$PUBLISH/" 2>/dev/null
  tar -czf "$PUBLISH/scurve_runs_raw.tar.gz" -C "$OUT/scurve_runs" curves prompts
  cp "$OUT/machine.txt" "$PUBLISH/machine_scurve_runs.txt"
  echo "published to $PUBLISH"
fi

finish
