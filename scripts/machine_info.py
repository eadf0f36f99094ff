#!/usr/bin/env python
"""Print the record that heads every GPU run's output folder: date, git commit, Python and library versions, GPUs,
and the command that was run (``python scripts/machine_info.py COMMAND...``).

The commit is ``$PPA_COMMIT`` when set (code run outside its git checkout, e.g. an exported tree), else
``git rev-parse HEAD`` of this checkout, else ``unknown`` (``ppa_hf.recipes.stamp.git_commit``).
"""

import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ppa_hf

from ppa_hf.recipes.stamp import git_commit, gpu_names, utc_now, version  # noqa: E402


def main() -> int:
    import torch

    gpus = gpu_names()
    lines = {
        "date": utc_now(),
        "command": " ".join(sys.argv[1:]) or "-",
        "git commit": git_commit(),
        "gpus": f"{len(gpus)} x {gpus[0]}" if gpus and len(set(gpus)) == 1 else (", ".join(gpus) or "none"),
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        **{name: version(name) for name in ("transformers", "accelerate", "peft", "triton", "lm_eval")},
        "host": f"{platform.machine()}, {platform.system()} {platform.release()}",
    }
    for key, value in lines.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
