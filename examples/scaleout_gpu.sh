#!/usr/bin/env bash
# Issue 6 (scale-out) on the device tool's 2-GPU machine (nvidia-h200-x2); the figures of docs/distributed.md.
# Model: the random-init Llama of about 1B parameters (--model-config llama-1b), full fine-tune, bf16.
#   bash examples/scaleout_gpu.sh curves      1 GPU / DDP / FSDP loss curves, FSDP resume 2 -> 1 and 1 -> 2
#   bash examples/scaleout_gpu.sh resume      FSDP resume only (re-run after the optimizer-state fix)
#   bash examples/scaleout_gpu.sh throughput  8k / 16k tokens, 1 GPU, DDP on 2, FSDP on 2 (--one-gpu / --two-gpu)
#   bash examples/scaleout_gpu.sh tests2      tests/test_gpu_distributed.py (FSDP resume 1 <-> 2 GPUs, tiny model)
#   bash examples/scaleout_gpu.sh resume1     one-GPU machine: FSDP resume at step 10 on 1 GPU (same count)
# The first call on a fresh machine carries .whl .dev/tok .dev/data (staged to /tmp/ppa_stage for later calls).
# As run on 2026-11-29: call 1 "curves" (found the FSDP resume bug), call 2 "resume", call 3 "throughput"
# (with workflows_gpu.sh close3; see docs/distributed.md).
# .whl holds datasets/evaluate and their missing dependencies (the device image lacks them; see workflows_gpu.sh);
# .dev/tok is the SmolLM2 tokenizer saved with save_pretrained; .dev/data a copy of ../shared/data.
# Every command's log goes to /tmp/logs and is packed into $OUT/logs.tgz after each command, so a call cut
# short keeps what ran; wall times and exit codes are in timings.txt inside it.
set -uo pipefail
S=/tmp/ppa_stage
L=/tmp/logs
mkdir -p "$S" "$L"
if ! PYTHONPATH=/tmp/site python3 -c "import datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
for d in tok data; do [ -d ".dev/$d" ] && [ ! -d "$S/$d" ] && cp -r ".dev/$d" "$S/$d"; done
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{ nvidia-smi -L; date -u
  python3 -c "import torch as t, transformers as tf, accelerate as a; print(t.__version__, tf.__version__, a.__version__)"
} >> "$L/machine.txt" 2>&1

pack() { tar czf "$OUT/logs.tgz" -C "$L" . 2>/dev/null; }
STEP_LOG_DIR=$L
after_step() { pack; }
source examples/device_step.sh
keep_log() { cp "$1/train_log.jsonl" "$L/$2.jsonl" 2>/dev/null; pack; }

CFG=examples/accelerate_configs
LAUNCH="accelerate launch --config_file"
FT="examples/finetune.py --model-config llama-1b --tokenizer $S/tok --lora-r 0 --no-progress"
# 20 steps on GSM8K text, global batch G = 32 sequences of <= 512 tokens: 1 process 16 x 2 accumulation steps,
# 2 processes 16 x 1
CURVE="$FT --train-file $S/data/gsm8k/train.jsonl --p 0.75 --seq-len 512 --max-steps 20 --lr 3e-4 --seed 0"
CURVE="$CURVE --batch-size 16"
R=/tmp/runs

fsdp_resume() {
    # FSDP on 2 GPUs, sharded checkpoints at steps 10 and 20
    step curve_fsdp2 240 $LAUNCH $CFG/gpu_fsdp.yaml --main_process_port 29512 $CURVE --save-every 10 \
      --keep-checkpoints 2 --output-dir $R/fsdp2
    keep_log $R/fsdp2 curve_fsdp2
    # FSDP on 1 GPU stopped at step 10 (GPU 0)  ||  the 2-GPU step-10 checkpoint resumed on 1 GPU (GPU 1)
    ( step fsdp1_stop10 200 $LAUNCH $CFG/gpu_fsdp.yaml --num_processes 1 --gpu_ids 0 --main_process_port 29513 \
        $CURVE --grad-accum 2 --stop-after 10 --output-dir $R/fsdp1; keep_log $R/fsdp1 fsdp1_stop10 ) &
    step resume_2to1 200 $LAUNCH $CFG/gpu_fsdp.yaml --num_processes 1 --gpu_ids 1 --main_process_port 29514 \
      $CURVE --grad-accum 2 --resume-from $R/fsdp2/checkpoints/step-10 --output-dir $R/fsdp_2to1
    keep_log $R/fsdp_2to1 resume_2to1
    wait
    # the 1-GPU step-10 checkpoint resumed on 2 GPUs
    step resume_1to2 200 $LAUNCH $CFG/gpu_fsdp.yaml --main_process_port 29515 $CURVE \
      --resume-from $R/fsdp1/checkpoints/step-10 --output-dir $R/fsdp_1to2
    keep_log $R/fsdp_1to2 resume_1to2
    ls -la $R/*/checkpoints/* $R/fsdp2 > "$L/files.txt" 2>&1
    for pair in "gpu1 ddp2" "gpu1 fsdp2" "gpu1 fsdp1" "fsdp2 fsdp_2to1" "fsdp2 fsdp_1to2" "ddp2 fsdp2"; do
      set -- $pair
      [ -f $R/$1/train_log.jsonl ] && [ -f $R/$2/train_log.jsonl ] || continue
      echo "== $1 vs $2" >> "$L/compare.txt"
      python3 examples/compare_loss_curves.py $R/$1/train_log.jsonl $R/$2/train_log.jsonl >> "$L/compare.txt" 2>&1
    done
    # the final models load with attn_implementation="ppa" and the p they were trained at
    step load_final 120 python3 - $R/fsdp2 $R/fsdp_2to1 $R/fsdp_1to2 <<'EOF'
import sys, torch, ppa_hf
from transformers import AutoModelForCausalLM, AutoTokenizer
text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
first = None
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="ppa", dtype=torch.float32).cuda().eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(text, return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()]).cpu()
    diff = "" if first is None else f" max|w - w(fsdp2)| {(flat - first).abs().max().item():.3e}"
    first = flat if first is None else first
    print(f"{path}: attn={model.config._attn_implementation} ppa_p={model.config.ppa_p} "
          f"ppa_window={model.config.ppa_window} params={flat.numel()} loss={loss:.4f}{diff}", flush=True)
EOF
}

case "${1:-}" in
  curves)
    # one GPU (GPU 1) while the GPU correctness tests run on GPU 0
    ( export CUDA_VISIBLE_DEVICES=0
      step gpu_tests 240 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_kernels.py ) &
    step curve_1gpu 200 $LAUNCH $CFG/gpu_1.yaml --gpu_ids 1 $CURVE --grad-accum 2 --output-dir $R/gpu1
    keep_log $R/gpu1 curve_1gpu
    wait
    step curve_ddp2 200 $LAUNCH $CFG/gpu_ddp.yaml --main_process_port 29511 $CURVE --output-dir $R/ddp2
    keep_log $R/ddp2 curve_ddp2
    fsdp_resume ;;
  resume)
    fsdp_resume ;;
  resume1)  # one-GPU machine: FSDP (1 process) 20 steps with a sharded checkpoint at 10, resumed at 10 on 1 GPU
    step fsdp1_full 240 $LAUNCH $CFG/gpu_fsdp.yaml --num_processes 1 --gpu_ids 0 --main_process_port 29516 $CURVE \
      --grad-accum 2 --save-every 10 --keep-checkpoints 2 --output-dir $R/fsdp1_full
    keep_log $R/fsdp1_full fsdp1_full
    step resume_1to1 200 $LAUNCH $CFG/gpu_fsdp.yaml --num_processes 1 --gpu_ids 0 --main_process_port 29517 \
      $CURVE --grad-accum 2 --resume-from $R/fsdp1_full/checkpoints/step-10 --output-dir $R/fsdp_1to1
    keep_log $R/fsdp_1to1 resume_1to1
    echo "== fsdp1_full vs fsdp_1to1" >> "$L/compare.txt"
    python3 examples/compare_loss_curves.py $R/fsdp1_full/train_log.jsonl $R/fsdp_1to1/train_log.jsonl \
      >> "$L/compare.txt" 2>&1
    step load_final1 120 python3 -c "import sys, torch, ppa_hf
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation='ppa')
print(sys.argv[1], 'attn', m.config._attn_implementation, 'ppa_p', m.config.ppa_p)" $R/fsdp_1to1 ;;
  throughput)  # [--one-gpu | --two-gpu]: only the 1-GPU runs, or only the DDP / FSDP runs on 2 GPUs
    # tokens/s and peak memory per GPU: 1 GPU, DDP on 2, FSDP on 2; batch 1 per GPU, gradient checkpointing
    TP="$FT --synthetic-data --batch-size 1 --max-steps 6 --gradient-checkpointing --p 0.75 --no-save"
    for len in 8192 16384; do
      if [ "${2:-}" != --two-gpu ]; then
        step tp_1gpu_$len 120 $LAUNCH $CFG/gpu_1.yaml --gpu_ids 0 $TP --seq-len $len --output-dir $R/tp_1gpu_$len
        keep_log $R/tp_1gpu_$len tp_1gpu_$len
      fi
      [ "${2:-}" = --one-gpu ] && continue
      step tp_ddp2_$len 120 $LAUNCH $CFG/gpu_ddp.yaml --main_process_port 29521 $TP --seq-len $len \
        --output-dir $R/tp_ddp2_$len
      keep_log $R/tp_ddp2_$len tp_ddp2_$len
      step tp_fsdp2_$len 120 $LAUNCH $CFG/gpu_fsdp.yaml --main_process_port 29522 $TP --seq-len $len \
        --output-dir $R/tp_fsdp2_$len
      keep_log $R/tp_fsdp2_$len tp_fsdp2_$len
    done ;;
  tests2)  # the FSDP resume test across GPU counts (tiny model), on 2 GPUs
    export PPA_HF_TEST_TOKENIZER=$S/tok
    step gpu_distributed_tests 200 python3 -m pytest -q -s -rs -p no:cacheprovider tests/test_gpu_distributed.py ;;
  *) echo "usage: bash examples/scaleout_gpu.sh curves|resume|resume1|throughput [--one-gpu|--two-gpu]|tests2" >&2; exit 2 ;;
esac
cat "$L/timings.txt"
pack
