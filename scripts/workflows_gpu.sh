#!/usr/bin/env bash
# `make workflows-gpu`: the one-GPU timings of docs/evaluate.md and docs/finetune.md (embedded SmolLM2-135M-Instruct,
# PPA p = 0.75, backend auto). Writes to $OUT: one log per command, eval/*.json (+ .samples.jsonl), the LoRA
# fine-tune in finetune_lora/ (its train_log.jsonl), lm_eval/, sweep_gsm8k/ (sweep.csv, sweep.png),
# generation_profile.jsonl, eval_workload_*/ (benchmarks/eval_workload.py), timings.txt (wall time of each command), machine.txt.
source "$(dirname "$0")/gpu_common.sh"
start "make workflows-gpu" 1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

EVAL=("$PYTHON" -m ppa_hf.cli eval)
GSM8K=(--task gsm8k --data "$DATA/gsm8k/test.jsonl" --limit 200 --batch-size 50 --max-new-tokens 256)
mkdir -p "$OUT/eval"

# zero-shot PPA evaluations
step eval_gsm8k_p075 "${EVAL[@]}" --p 0.75 "${GSM8K[@]}" --output "$OUT/eval/gsm8k_p075.json"
step eval_math500_p075 "${EVAL[@]}" --p 0.75 --task math500 --data "$DATA/math500/test.jsonl" --limit 100 \
  --batch-size 50 --max-new-tokens 512 --output "$OUT/eval/math500_p075.json"
step eval_ppl_p075 "${EVAL[@]}" --p 0.75 --task perplexity --data pydoc --context 2048 --max-windows 16 \
  --output "$OUT/eval/ppl_p075.json"
# LoRA fine-tune at p = 0.75 (bf16, one GPU), then the saved model evaluated with the p it was trained at
step finetune_lora "${LAUNCH[@]}" --config_file examples/accelerate_configs/gpu_1.yaml examples/finetune.py \
  --train-file "$DATA/gsm8k/train.jsonl" --p 0.75 --output-dir "$OUT/finetune_lora" --max-steps 100 --seq-len 512 \
  --batch-size 16 --lora-r 16 --lr 2e-4 --limit 1600 --no-progress
step eval_gsm8k_p075_finetuned "${EVAL[@]}" --model "$OUT/finetune_lora" "${GSM8K[@]}" \
  --output "$OUT/eval/gsm8k_p075_finetuned.json"
# lm-evaluation-harness through the ppa model type
step lm_eval_gsm8k env PPA_HF_DATA_DIR="$DATA" "$PYTHON" -m ppa_hf.recipes.lm_eval run --model ppa \
  --model_args ppa_p=0.75 --tasks ppa_gsm8k --limit 100 --batch_size 50 --output_path "$OUT/lm_eval"
# a p sweep (the model is loaded once)
step sweep_gsm8k "$PYTHON" -m ppa_hf.cli sweep --ps 0 0.5 0.75 1 "${GSM8K[@]}" --out-dir "$OUT/sweep_gsm8k"
# prefill, decoding and training steps of the stock sdpa path and PPA auto on a random model of SmolLM2's shape
step generation_profile "$PYTHON" benchmarks/generation_profile.py --attns sdpa ppa-auto --prompt-lengths 700 1000 \
  --train-lengths 269 275 301 288 310 333 --out "$OUT/generation_profile.jsonl"
# the evaluation workload against sdpa in one process (docs/benchmarks.md): speed, and answers equal to sdpa's
step eval_workload_fp32 "$PYTHON" benchmarks/eval_workload.py --data "$DATA/gsm8k/test.jsonl" --out "$OUT/eval_workload_fp32" \
  --dtype float32
step eval_workload_bf16 "$PYTHON" benchmarks/eval_workload.py --data "$DATA/gsm8k/test.jsonl" --out "$OUT/eval_workload_bf16" \
  --dtype bfloat16

finish
