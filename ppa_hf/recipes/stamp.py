"""Where and with what a result was produced: GPU, torch, transformers, Python, commit, date.

The commit is ``$PPA_COMMIT`` when set (code run outside its git checkout, e.g. an exported tree), else
``git rev-parse HEAD`` of the checkout this package was imported from (with `` (with uncommitted changes)`` when
tracked files differ), else ``unknown``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=_REPO,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None


def git_commit() -> str:
    """The commit of the code (see the module docstring)."""
    env = os.environ.get("PPA_COMMIT", "").strip()
    if env:
        return f"{env} (PPA_COMMIT)"
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return commit + (" (with uncommitted changes)" if dirty else "")


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def gpu_names() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def machine_stamp(device=None) -> dict:
    """``{"gpu", "torch", "transformers", "python", "commit", "date"}`` for a result computed on ``device``
    (a ``torch.device``; None: the first GPU if any)."""
    import torch

    if device is not None and getattr(device, "type", str(device)) == "cuda":
        gpu = torch.cuda.get_device_name(device)
    elif device is None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    else:
        gpu = f"none (CPU: {platform.processor() or platform.machine()})"
    return {"gpu": gpu, "torch": torch.__version__, "transformers": version("transformers"),
            "python": platform.python_version(), "commit": git_commit(), "date": utc_now()}
