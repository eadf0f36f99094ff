#!/usr/bin/env bash
# `make scaleout-gpu`: the fine-tune runs behind docs/distributed.md. Model: a random-init Llama of 1.07B parameters
# (--model-config llama-1b), full fine-tune, bf16, PPA p = 0.75, the SmolLM2 tokenizer.
#   one GPU:         loss curve; FSDP (1 process) with a sharded checkpoint at step 10, resumed from it;
#                    throughput at 8k and 16k tokens
#   two GPUs or more: also the DDP and FSDP loss curves on 2 GPUs, FSDP checkpoints resumed 2 -> 1 and 1 -> 2,
#                    throughput of DDP and FSDP on 2 GPUs
#   always:          tests/test_gpu_distributed.py (tiny model; its 2-GPU cases skip on one GPU)
# Writes to $OUT: NAME.log and NAME.jsonl (the run's train_log.jsonl) per run, the runs themselves in runs/,
# compare.txt (examples/compare_loss_curves.py on pairs of runs), load_final.log (the final models loaded back),
# timings.txt, machine.txt.
source "$(dirname "$0")/gpu_common.sh"
start "make scaleout-gpu" 1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

CFG=examples/accelerate_configs
R=$OUT/runs
FT=(examples/finetune.py --model-config llama-1b --lora-r 0 --no-progress)
# 20 steps on GSM8K text at a global batch of 32 sequences of <= 512 tokens:
# one process 16 x 2 accumulation steps, two processes 16 x 1
CURVE=("${FT[@]}" --train-file "$DATA/gsm8k/train.jsonl" --p 0.75 --seq-len 512 --max-steps 20 --lr 3e-4 --seed 0
       --batch-size 16)
ONE_FSDP=("${LAUNCH[@]}" --config_file "$CFG/gpu_fsdp.yaml" --num_processes 1 --gpu_ids 0)
TWO=$([ "$GPUS" -ge 2 ] && echo yes || echo no)

# run NAME LAUNCHER... -- FINETUNE_ARGS...: a fine-tune into $R/NAME, its train log kept as $OUT/NAME.jsonl
run() {
  local name=$1; shift
  step "$name" "$@" --output-dir "$R/$name"
  cp "$R/$name/train_log.jsonl" "$OUT/$name.jsonl" 2>/dev/null || true
}
two_gpu() {  # two_gpu NAME...: record that these runs need 2 GPUs
  for name in "$@"; do skip "$name" "needs 2 GPUs, found $GPUS"; done
}

# loss curves at the same global batch: 1 GPU, DDP on 2, FSDP on 2 (sharded checkpoints at steps 10 and 20)
run curve_1gpu "${LAUNCH[@]}" --config_file "$CFG/gpu_1.yaml" "${CURVE[@]}" --grad-accum 2
if [ "$TWO" = yes ]; then
  run curve_ddp2 "${LAUNCH[@]}" --config_file "$CFG/gpu_ddp.yaml" --num_processes 2 --main_process_port 29511 \
    "${CURVE[@]}"
  run curve_fsdp2 "${LAUNCH[@]}" --config_file "$CFG/gpu_fsdp.yaml" --num_processes 2 --main_process_port 29512 \
    "${CURVE[@]}" --save-every 10 --keep-checkpoints 2
  # FSDP on 1 GPU stopped at step 10; the 2-GPU step-10 checkpoint resumed on 1 GPU, the 1-GPU one on 2
  run fsdp1_stop10 "${ONE_FSDP[@]}" --main_process_port 29513 "${CURVE[@]}" --grad-accum 2 --stop-after 10
  run resume_2to1 "${ONE_FSDP[@]}" --main_process_port 29514 "${CURVE[@]}" --grad-accum 2 \
    --resume-from "$R/curve_fsdp2/checkpoints/step-10"
  run resume_1to2 "${LAUNCH[@]}" --config_file "$CFG/gpu_fsdp.yaml" --num_processes 2 --main_process_port 29515 \
    "${CURVE[@]}" --resume-from "$R/fsdp1_stop10/checkpoints/step-10"
else
  two_gpu curve_ddp2 curve_fsdp2 fsdp1_stop10 resume_2to1 resume_1to2
fi
# FSDP with one process: 20 steps with a sharded checkpoint at step 10, and that checkpoint resumed
run fsdp1_full "${ONE_FSDP[@]}" --main_process_port 29516 "${CURVE[@]}" --grad-accum 2 --save-every 10 \
  --keep-checkpoints 2
run resume_1to1 "${ONE_FSDP[@]}" --main_process_port 29517 "${CURVE[@]}" --grad-accum 2 \
  --resume-from "$R/fsdp1_full/checkpoints/step-10"

# the curves compared step by step
: > "$OUT/compare.txt"
for pair in "curve_1gpu curve_ddp2" "curve_1gpu curve_fsdp2" "curve_1gpu fsdp1_stop10" "curve_fsdp2 resume_2to1" \
            "curve_fsdp2 resume_1to2" "curve_ddp2 curve_fsdp2" "fsdp1_full resume_1to1"; do
  set -- $pair
  [ -f "$OUT/$1.jsonl" ] && [ -f "$OUT/$2.jsonl" ] || continue
  echo "== $1 vs $2" >> "$OUT/compare.txt"
  "$PYTHON" examples/compare_loss_curves.py "$OUT/$1.jsonl" "$OUT/$2.jsonl" >> "$OUT/compare.txt" 2>&1
done
cat "$OUT/compare.txt"
# the final models load with attn_implementation="ppa" and the p they were trained at
finals=()
for name in curve_fsdp2 resume_2to1 resume_1to2 curve_ddp2 fsdp1_full resume_1to1; do
  [ -f "$R/$name/config.json" ] && finals+=("$R/$name")
done
step load_final "$PYTHON" scripts/load_final.py "${finals[@]}"

# throughput: synthetic tokens, batch 1 per GPU, gradient checkpointing, 6 steps (step 1 compiles the kernels)
TP=("${FT[@]}" --synthetic-data --batch-size 1 --max-steps 6 --gradient-checkpointing --p 0.75 --no-save)
for len in 8192 16384; do
  run "tp_1gpu_$len" "${LAUNCH[@]}" --config_file "$CFG/gpu_1.yaml" "${TP[@]}" --seq-len "$len"
  if [ "$TWO" = yes ]; then
    run "tp_ddp2_$len" "${LAUNCH[@]}" --config_file "$CFG/gpu_ddp.yaml" --num_processes 2 \
      --main_process_port 29521 "${TP[@]}" --seq-len "$len"
    run "tp_fsdp2_$len" "${LAUNCH[@]}" --config_file "$CFG/gpu_fsdp.yaml" --num_processes 2 \
      --main_process_port 29522 "${TP[@]}" --seq-len "$len"
  else
    two_gpu "tp_ddp2_$len" "tp_fsdp2_$len"
  fi
done

# FSDP resume 1 -> 1, 2 -> 1 and 1 -> 2 on a tiny model against the uninterrupted curve (needs pytest: the dev extra)
step gpu_distributed_tests "$PYTHON" -m pytest -q -s -rs -p no:cacheprovider tests/test_gpu_distributed.py

finish
