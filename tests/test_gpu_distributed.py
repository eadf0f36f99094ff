"""FSDP fine-tuning on GPUs: a sharded checkpoint resumes on the same or another GPU count and the loss curve
continues as the uninterrupted run's (skips without enough CUDA GPUs; Accelerate refuses FSDP on CPU).

Tiny random Llama, fp32, synthetic tokens, global batch 4 on any GPU count. `examples/scaleout_gpu.sh` runs the
same on the 1B model. Set PPA_HF_TEST_TOKENIZER to a saved tokenizer folder to avoid building the tiny model
fixture (which reads the SmolLM2 GGUF).
"""

import json
import os
import socket

import pytest
import torch

from conftest import REPO_ROOT, run_finetune

FSDP_CONFIG = REPO_ROOT / "examples" / "accelerate_configs" / "gpu_fsdp.yaml"
GLOBAL_BATCH, STEPS, STOP = 4, 6, 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tokenizer_dir(request) -> str:
    return os.environ.get("PPA_HF_TEST_TOKENIZER") or str(request.getfixturevalue("tiny_model_dir"))


def _launch(processes: int, out, tokenizer: str, *extra: str) -> None:
    launcher = ("accelerate", "--config_file", str(FSDP_CONFIG), "--num_processes", str(processes),
                "--gpu_ids", ",".join(str(i) for i in range(processes)), "--main_process_port", str(_free_port()))
    args = ["--model-config", "tiny-llama", "--tokenizer", tokenizer, "--synthetic-data", "--seq-len", "128",
            "--lora-r", "0", "--lr", "1e-2", "--mixed-precision", "no", "--max-steps", str(STEPS),
            "--batch-size", str(GLOBAL_BATCH // processes), "--p", "0.5", "--window", "16", "--no-progress",
            "--output-dir", str(out), *extra]
    result = run_finetune(args, launcher, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def _losses(out) -> dict:
    with open(out / "train_log.jsonl") as handle:
        return {row["step"]: row["loss"] for row in map(json.loads, handle)}


@pytest.mark.parametrize("first,second", [(1, 1), (2, 1), (1, 2)])
def test_fsdp_checkpoint_resumes_across_gpu_counts(first, second, tokenizer_dir, tmp_path):
    if torch.cuda.device_count() < max(first, second):
        pytest.skip(f"needs {max(first, second)} CUDA GPU(s) for FSDP (found {torch.cuda.device_count()})")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _launch(first, whole, tokenizer_dir, "--save-every", str(STOP))
    state = json.loads((whole / "checkpoints" / f"step-{STOP}" / "trainer_state.json").read_text())
    assert state["step"] == STOP and state["optimizer_steps"] == STOP
    _launch(second, resumed, tokenizer_dir, "--resume-from", str(whole / "checkpoints" / f"step-{STOP}"))
    a, b = _losses(whole), _losses(resumed)
    assert sorted(b) == list(range(STOP + 1, STEPS + 1))
    diffs = {step: abs(a[step] - b[step]) for step in b}
    print(f"FSDP {first} -> {second} GPU(s): uninterrupted {[a[s] for s in b]}, resumed {[b[s] for s in b]}")
    assert max(diffs.values()) <= 1e-4, diffs
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(resumed, attn_implementation="ppa").config.ppa_p == 0.5
