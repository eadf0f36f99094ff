#!/usr/bin/env bash
# The one-GPU timings of docs/evaluate.md and docs/finetune.md, as sent through the device tool (one H200).
# The device image lacks datasets/evaluate/gguf/lm-eval: their wheels travel in .whl/ and .dev/lmw/ (git-ignored).
# The 98 MB GGUF travels in two parts (see examples/results_gpu.sh for the split):
#   call 1: carry .dev/smollm2.gguf.part_aa .dev/gguf-0.19.0-py3-none-any.whl .whl;  bash examples/workflows_gpu.sh stage
#   call 2: carry .dev/smollm2.gguf.part_ab .dev/data;                              bash examples/workflows_gpu.sh main
#   call 3: carry .dev/lmw .dev/data .dev/tok;                                       bash examples/workflows_gpu.sh extra
# (as run on 2026-11-28 after the GGUF-save fix: call 1 with "stage --no-tests", call 2 carrying
#  .dev/smollm2.gguf.part_ab .dev/data .dev/lmw: bash examples/workflows_gpu.sh final)
# .dev/lmw holds lm_eval and its missing dependencies as wheels (pip download / pip wheel): lm_eval, more_itertools,
# pytablewriter, DataProperty, mbstrdecoder, pathvalidate, tabledata, tcolorpy, typepy, chardet, nltk, defusedxml,
# rouge_score, sqlitedict, word2number - and pytz, which the 2026-11-29 run lacked (lm-eval's table then failed).
# Every command's log and wall time are written straight to $OUT (timings.txt), so a call cut short keeps what ran.
set -uo pipefail
STAGE=/tmp/ppa_model
mkdir -p "$STAGE"
if [ "${1:-}" = stage ]; then
  cp .dev/smollm2.gguf.part_aa .dev/gguf-*.whl "$STAGE"/ && cp -r .whl "$STAGE"/whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STAGE"/whl/*.whl "$STAGE"/gguf-*.whl
  PYTHONPATH=/tmp/site python3 -c "import datasets, evaluate, gguf, pyarrow, fsspec; print('datasets', datasets.__version__, 'evaluate', evaluate.__version__, 'pyarrow', pyarrow.__version__, 'fsspec', fsspec.__version__)"
  nvidia-smi -L
  [ "${2:-}" = --no-tests ] && exit 0
  # the GPU correctness tests, while the machine is up (printed errors: -s)
  PYTHONPATH=/tmp/site:$PWD timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_kernels.py \
    -k "model_paths or left_padded" > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
  exit 0
fi
[ -f .dev/smollm2.gguf.part_ab ] && cp .dev/smollm2.gguf.part_ab "$STAGE"/
[ -f "$STAGE/smollm2.gguf" ] || cat "$STAGE"/smollm2.gguf.part_aa "$STAGE"/smollm2.gguf.part_ab > "$STAGE/smollm2.gguf"
if [ -d .dev/lmw ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/lmw/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PPA_HF_DEFAULT_GGUF="$STAGE/smollm2.gguf" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
D=$PWD/.dev/data
[ -d "$D" ] || D=/tmp/ppa_stage/data  # staged by examples/scaleout_gpu.sh on an earlier call to this machine
E="python3 -m ppa_hf.cli"
mkdir -p "$OUT/eval"
{ python3 -c "import torch, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__)"
  git log -1 --format=%H 2>/dev/null; date -u; } >> "$OUT/machine.txt"

STEP_LOG_DIR=$OUT
source examples/device_step.sh

case "${1:-}" in
  main)
    step genprof 90 python3 benchmarks/generation_profile.py --attns sdpa ppa-auto --prompt-lengths 700 1000 \
      --train-lengths 269 275 301 288 310 333 --out "$OUT/genprof.jsonl"
    step gsm8k_p075 120 $E eval --p 0.75 --task gsm8k --data "$D/gsm8k/test.jsonl" --limit 200 --batch-size 50 \
      --max-new-tokens 256 --output "$OUT/eval/gsm8k_p075.json"
    step finetune_lora 120 accelerate launch --config_file examples/accelerate_configs/gpu_1.yaml examples/finetune.py \
      --train-file "$D/gsm8k/train.jsonl" --p 0.75 --output-dir /tmp/ft_lora --max-steps 100 --seq-len 512 \
      --batch-size 16 --lora-r 16 --lr 2e-4 --limit 1600 --no-progress
    cp /tmp/ft_lora/train_log.jsonl "$OUT/ft_lora_train_log.jsonl" 2>/dev/null
    step gsm8k_p075_finetuned 90 $E eval --model /tmp/ft_lora --task gsm8k --data "$D/gsm8k/test.jsonl" --limit 200 \
      --batch-size 50 --max-new-tokens 256 --output "$OUT/eval/gsm8k_p075_finetuned.json"
    step math500_p075 100 $E eval --p 0.75 --task math500 --data "$D/math500/test.jsonl" --limit 100 --batch-size 50 \
      --max-new-tokens 512 --output "$OUT/eval/math500_p075.json" ;;
  final)  # after the GGUF-save fix: LoRA fine-tune + save, the saved model evaluated, lm-eval
    step finetune_lora 75 accelerate launch --config_file examples/accelerate_configs/gpu_1.yaml examples/finetune.py \
      --train-file "$D/gsm8k/train.jsonl" --p 0.75 --output-dir /tmp/ft_lora2 --max-steps 100 --seq-len 512 \
      --batch-size 16 --lora-r 16 --lr 2e-4 --limit 1600 --no-progress
    cp /tmp/ft_lora2/train_log.jsonl "$OUT/ft_lora_train_log.jsonl" 2>/dev/null
    step gsm8k_p075_finetuned 65 $E eval --model /tmp/ft_lora2 --task gsm8k --data "$D/gsm8k/test.jsonl" --limit 200 \
      --batch-size 50 --max-new-tokens 256
    PPA_HF_DATA_DIR=$D step lm_eval_gsm8k 75 python3 -m ppa_hf.lm_eval_main run --model ppa \
      --model_args ppa_p=0.75 --tasks ppa_gsm8k --limit 100 --batch_size 50
    step gsm8k_p1 60 $E eval --p 1 --task gsm8k --data "$D/gsm8k/test.jsonl" --limit 200 --batch-size 50 \
      --max-new-tokens 256 ;;
  close3)  # 2026-11-29: the two one-GPU timings issue 3 still lacked (one H200)
    export PPA_HF_DATA_DIR=$D CUDA_VISIBLE_DEVICES=0
    step lm_eval_gsm8k 120 python3 -m ppa_hf.lm_eval_main run --model ppa --model_args ppa_p=0.75 \
      --tasks ppa_gsm8k --limit 100 --batch_size 50 --output_path /tmp/close3/lm_eval
    step sweep_gsm8k 420 $E sweep --ps 0 0.5 0.75 1 --task gsm8k --data "$D/gsm8k/test.jsonl" --limit 200 \
      --batch-size 50 --max-new-tokens 256 --out-dir /tmp/close3/sweep
    tar czf "$OUT/close3.tgz" -C /tmp/close3 . ;;
  extra)
    step gsm8k_p1 100 $E eval --p 1 --task gsm8k --data "$D/gsm8k/test.jsonl" --limit 200 --batch-size 50 \
      --max-new-tokens 256 --output "$OUT/eval/gsm8k_p1.json"
    step gsm8k_p075_naive 100 $E eval --p 0.75 --backend naive --task gsm8k --data "$D/gsm8k/test.jsonl" --limit 200 \
      --batch-size 50 --max-new-tokens 256 --output "$OUT/eval/gsm8k_p075_naive.json"
    step sweep_ppl 100 $E sweep --ps 0 0.25 0.5 0.75 0.875 1 --task perplexity --data pydoc --context 2048 \
      --max-windows 16 --out-dir "$OUT/sweep_ppl"
    PPA_HF_DATA_DIR=$D step lm_eval_gsm8k 150 python3 -m ppa_hf.lm_eval_main run --model ppa \
      --model_args ppa_p=0.75 --tasks ppa_gsm8k --limit 200 --batch_size 50 --output_path "$OUT/lm_eval"
    step finetune_full 120 accelerate launch --config_file examples/accelerate_configs/gpu_1.yaml examples/finetune.py \
      --train-file "$D/gsm8k/train.jsonl" --p 0.75 --output-dir /tmp/ft_full --max-steps 100 --seq-len 512 \
      --batch-size 16 --lora-r 0 --lr 2e-5 --limit 1600 --no-progress
    cp /tmp/ft_full/train_log.jsonl "$OUT/ft_full_train_log.jsonl" 2>/dev/null ;;
esac
cat "$OUT/timings.txt"
