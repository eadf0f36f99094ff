"""Shared test helpers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ppa_hf  # noqa: F401  (registers "ppa")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(*parts) -> Path:
    """A file under ../shared/data (beside the checkout, as in CI); skip-free: a missing file fails the test."""
    path = SHARED_DATA.joinpath(*parts)
    assert path.exists(), f"offline data missing: {path} (CI lays ../shared beside the checkout)"
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# --- workflow tests (fine-tune / eval / sweep / lm-eval): a saved tiny model, and subprocess helpers ---------
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama with the real SmolLM2 tokenizer (vocab 49152), built once per session."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppa_hf.models import default_gguf, tiny_config

    folder = tmp_path_factory.mktemp("tiny_llama")
    path, gguf = default_gguf()
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    config = tiny_config("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def subprocess_env() -> dict:
    """Environment for running the package's commands from the checkout in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


FINETUNE = str(REPO_ROOT / "examples" / "finetune.py")


def run_finetune(args, launcher=("python",), timeout=300):
    """examples/finetune.py with ``args``: under plain python, or ``launcher=("accelerate", *launch_options)``."""
    if launcher[0] == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher[1:], FINETUNE, *args]
    else:
        cmd = [sys.executable, FINETUNE, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=timeout,
                          cwd=REPO_ROOT)
