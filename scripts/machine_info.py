#!/usr/bin/env python
"""Print the record that heads every GPU run's output folder: date, git commit, Python and library versions, GPUs,
and the command that was run (``python scripts/machine_info.py COMMAND...``)."""

import datetime
import importlib.metadata
import platform
import subprocess
import sys


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> int:
    import torch

    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    lines = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join(sys.argv[1:]) or "-",
        "git commit": commit + (" (with uncommitted changes)" if dirty and dirty != "unknown" else ""),
        "gpus": f"{len(gpus)} x {gpus[0]}" if gpus and len(set(gpus)) == 1 else (", ".join(gpus) or "none"),
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        **{name: _version(name) for name in ("transformers", "accelerate", "peft", "triton", "lm_eval")},
        "host": f"{platform.machine()}, {platform.system()} {platform.release()}",
    }
    for key, value in lines.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
