# The two commands of the README. Both do all set-up first (idempotent; fast when already installed).
PYTHON ?= python3
# GPU runs: output folder (one subfolder per target) and the GSM8K / MATH-500 JSONL folder.
OUT ?= outputs/gpu
DATA ?= ../shared/data

.PHONY: setup demo test masks results-gpu scaleout-gpu workflows-gpu bench-gpu

setup:
	bash scripts/setup.sh

# The main job: SmolLM2-135M-Instruct patched to PPA, perplexity vs p, CSV + PNG, one generated answer.
demo: setup
	$(PYTHON) -m ppa_hf.recipes.demo

# The test suite (CPU, offline; needs ../shared/data beside the checkout).
test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider --durations=15 tests

# Pictures of the masks in docs/img (attention-gym style: the file name records the parameters).
masks:
	for p in 0 0.25 0.5 0.75 0.875 1; do $(PYTHON) -m ppa_hf.cli mask --p $$p --length 256 --window 32 --out docs/img/mask_p$${p}_w32_s0.png; done
	$(PYTHON) -m ppa_hf.cli mask --p 0.5 --length 256 --window 32 --sink-tokens 4 --out docs/img/mask_p0.5_w32_s4.png
	$(PYTHON) -m ppa_hf.cli mask --p 0.75 --length 1024 --window 64 --granularity block --block-size 64 --out docs/img/mask_p0.75_w64_s0_block64.png

# GPU reproduction: the runs behind the measured figures of docs/, on a CUDA machine where this package, its `dev`
# extra and a CUDA build of torch are installed (no set-up step: `setup` would install a CPU torch if none is there).
# Each target writes logs, CSV/JSON outputs, timings.txt and machine.txt (GPU, versions, commit, date) to $(OUT)/NAME.

# docs/results.md: zero-shot perplexity, sinks, block granularity, and the fine-tuned retrieval grid of section 6 on
# every GPU (several runs per GPU). SCURVE_SIZE=smoke: the reduced grid alone (about 5 minutes on one H200);
# SCURVE_ARGS: more `scurve_runs run` options; PUBLISH=docs/results_data: copy the grid's CSV, summary and plots there;
# LEGACY_SCURVE=1: also the one-seed fine-tunes of sections 2 and 3 as published.
SCURVE_SIZE ?= full
results-gpu:
	OUT=$(OUT)/results DATA=$(DATA) PYTHON=$(PYTHON) SCURVE_SIZE=$(SCURVE_SIZE) SCURVE_ARGS="$(SCURVE_ARGS)" \
	  PUBLISH=$(PUBLISH) LEGACY_SCURVE=$(LEGACY_SCURVE) bash scripts/results_gpu.sh

# docs/distributed.md: 1B loss curves on 1 and 2 GPUs (DDP, FSDP), FSDP resume across GPU counts, throughput
# (the 2-GPU runs are skipped, and listed as skipped, on a one-GPU machine)
scaleout-gpu:
	OUT=$(OUT)/scaleout DATA=$(DATA) PYTHON=$(PYTHON) bash scripts/scaleout_gpu.sh

# docs/evaluate.md and docs/finetune.md: one-GPU eval, LoRA fine-tune, lm-eval and sweep timings
workflows-gpu:
	OUT=$(OUT)/workflows DATA=$(DATA) PYTHON=$(PYTHON) bash scripts/workflows_gpu.sh

# docs/benchmarks.md: attention kernels, whole-model training/prefill and generation against sdpa (one GPU, about
# 45 minutes, estimated from its parts: never run as a whole); CSVs and results.md in $(OUT)/bench (benchmarks/results holds the published ones)
bench-gpu:
	$(PYTHON) -m benchmarks.run tune --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run tune-decode --batches 1 8 32 --contexts 32768 131072 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run kernels --lengths 32768 131072 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run packed --lengths 32768 --docs 4 32 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run train --shapes llama-1b --lengths 16384 32768 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run train --shapes llama-1b --lengths 131072 --reps 3 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run train --shapes llama-8b-layers --lengths 16384 32768 131072 --reps 3 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run train --shapes llama-1b --lengths 16384 --compiled-only --reps 3 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run train --shapes llama-8b-layers --lengths 16384 --compiled-only --reps 3 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run generate --gen-modes dynamic --batches 1 8 --contexts 1024 8192 32768 131072 --steps 24 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run generate --gen-modes dynamic --batches 32 --contexts 1024 8192 32768 --steps 24 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run generate --gen-modes static-compiled --batches 8 --contexts 32768 131072 --steps 24 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run generate --gen-modes static-compiled --batches 8 --contexts 32768 131072 --steps 24 --growing-mask --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run generate --timing generate --gen-modes dynamic --batches 1 8 --contexts 1024 8192 32768 --steps 16 --repeats 5 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run generate --timing generate --gen-modes dynamic --gen-layers 16 --batches 1 8 --contexts 32768 --steps 16 --repeats 5 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run generate --timing generate --gen-modes dynamic --baselines sdpa_flash --batches 1 --contexts 131072 --steps 16 --repeats 3 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run generate --timing generate --gen-modes static --baselines sdpa --batches 8 --contexts 32768 --steps 16 --repeats 2 --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run generate --timing generate --gen-modes static --baselines sdpa --batches 8 --contexts 32768 --steps 16 --repeats 2 --reuse-static-cache --out $(OUT)/bench
	$(PYTHON) -m benchmarks.run generate --timing generate --gen-modes dynamic --batches 32 --contexts 1024 8192 --steps 16 --repeats 3 --out $(OUT)/bench
	OUT=$(OUT)/bench $(PYTHON) benchmarks/decode_host.py --parts decode host-parts sdpa-kernels
	OUT=$(OUT)/bench $(PYTHON) benchmarks/profile_train.py
	OUT=$(OUT)/bench $(PYTHON) -m benchmarks.experiments.token_mask
