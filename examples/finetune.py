#!/usr/bin/env python
"""Fine-tune a causal LM with Power-based Partial Attention (PPA) on GSM8K / MATH-style data.

    accelerate launch --config_file examples/accelerate_configs/one_process.yaml examples/finetune.py \
        --train-file ../shared/data/gsm8k/train.jsonl --p 0.75 --output-dir runs/smollm2-p075 --max-steps 200 \
        --lora-r 16
    python examples/finetune.py ...           # one process, no launcher

    accelerate launch --config_file examples/accelerate_configs/cpu_2proc.yaml examples/finetune.py ...
    accelerate launch --config_file examples/accelerate_configs/cpu_2proc.yaml examples/finetune.py \
        --context-parallel 2 ...              # each sequence split over the 2 processes (docs/distributed.md)

All options: ``python examples/finetune.py --help``; the loop lives in ppa_hf/recipes/training.py.
"""

import os
import sys

# run from a checkout without installing the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppa_hf.recipes.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
