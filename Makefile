# The two commands of the README. Both do all set-up first (idempotent; fast when already installed).
PYTHON ?= python3

.PHONY: setup demo test masks

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
