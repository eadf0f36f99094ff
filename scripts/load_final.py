#!/usr/bin/env python
"""Load fine-tuned model folders with ``attn_implementation="ppa"`` and print, for each, the PPA settings read back
from its config, its parameter count, its loss on one sentence, and its largest weight difference to the first
folder (``python scripts/load_final.py RUN_DIR [RUN_DIR ...]``; used by scripts/scaleout_gpu.sh)."""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ppa_hf  # noqa: F401  (registers attn_implementation="ppa")

TEXT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def main(paths) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    first = None
    for path in paths:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="ppa", dtype=torch.float32)
        model.to(device).eval()
        ids = AutoTokenizer.from_pretrained(path)(TEXT, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters()]).cpu()
        diff = "" if first is None else f" max|w - w({paths[0]})| {(flat - first).abs().max().item():.3e}"
        first = flat if first is None else first
        print(f"{path}: attn={model.config._attn_implementation} ppa_p={model.config.ppa_p} "
              f"ppa_window={model.config.ppa_window} params={flat.numel()} loss={loss:.4f}{diff}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))
