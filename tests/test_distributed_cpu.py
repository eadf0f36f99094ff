"""Multi-process fine-tuning on CPU (DDP over gloo) through `accelerate launch`, checkpoints resumed across
process counts (2 -> 1 and 1 -> 2), context parallelism (one sequence split over the 2 processes: the losses and
weights of one process, full fine-tune and LoRA with resume), loss-curve logs compared with
examples/compare_loss_curves.py, and the shipped accelerate configs."""

import json
import subprocess
import sys

import pytest
import yaml
from transformers import AutoModelForCausalLM

from conftest import REPO_ROOT, run_finetune, shared_data

CONFIGS = REPO_ROOT / "examples" / "accelerate_configs"
COMPARE = str(REPO_ROOT / "examples" / "compare_loss_curves.py")


def launch(processes, args, port):
    launcher = ("python",) if processes == 1 else (
        "accelerate", "--config_file", str(CONFIGS / "cpu_2proc.yaml"), "--main_process_port", str(port))
    result = run_finetune(args, launcher, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def args_for(model, out, processes, lora_r, **extra):
    # the same global batch (2 examples per optimizer step) whatever the process count
    args = ["--model", str(model), "--train-file", str(shared_data("gsm8k", "train.jsonl")), "--output-dir", str(out),
            "--seq-len", "80", "--batch-size", str(2 // processes), "--limit", "40", "--no-progress", "--p", "0.75",
            "--window", "8", "--lr", "1e-2", "--max-steps", "4", "--lora-r", str(lora_r)]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def compare(a, b):
    result = subprocess.run([sys.executable, COMPARE, str(a / "train_log.jsonl"), str(b / "train_log.jsonl"),
                             "--tolerance", "1e-4"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[0])


@pytest.mark.parametrize("first,second,lora_r", [(2, 1, 0), (1, 2, 4)])
def test_resume_across_process_counts(first, second, lora_r, tiny_model_dir, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "run"
    launch(1, args_for(tiny_model_dir, reference, 1, lora_r), 29531)
    started = launch(first, args_for(tiny_model_dir, out, first, lora_r, stop_after=2), 29532 + first)
    assert f"{first} process(es)" in started.stdout
    assert not (out / "config.json").exists()
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["num_processes"] == first and state["examples_seen"] == 4
    resumed = launch(second, args_for(tiny_model_dir, out, second, lora_r, resume_from="latest"), 29540 + second)
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2 (saved by {first} process(es))" in resumed.stdout
    rows = log(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["num_processes"] for r in rows] == [first, first, second, second]
    assert all(r["global_batch"] == 2 for r in rows)
    # the same examples in the same order and a token-mean loss over the global batch: the curve is the
    # single-process run's (up to float summation order and the 6 decimals of the log)
    result = compare(reference, out)
    assert result["common_steps"] == 4 and result["max_abs_diff"] < 1e-4
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="ppa")
    assert model.config.ppa_p == 0.75 and model.config.ppa_window == 8


def context_parallel_args(model, out, lora_r, data, **extra):
    # seq-len 256 with window 16 and 2 sinks: the chunk border (token 128 of a 256-token sequence) falls inside the
    # window of the next chunk's first queries, and every query of the second chunk reads the first chunk's sinks
    args = ["--model", str(model), "--output-dir", str(out), "--seq-len", "256", "--batch-size", "2", "--no-progress",
            "--p", "0.5", "--window", "16", "--sink-tokens", "2", "--lr", "1e-2", "--lora-r", str(lora_r), *data]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def assert_same_weights(reference, out, trained_from):
    import torch

    expected, got, start = final_weights(reference), final_weights(out), final_weights(trained_from)
    assert expected.keys() == got.keys()
    moved = max(float((expected[k] - start[k]).abs().max()) for k in expected)
    assert moved > 1e-3, "training changed no weight"
    # Adam's first steps move a weight by about lr * sign(gradient) (lr = 1e-2 here), so an entry whose gradient is
    # near Adam's eps turns float summation order into a difference of up to about 2e-4 (2 of the 3M embedding
    # entries with transformers 5.25); a wrong gradient moves weights by about lr
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=5e-4, msg=name)


def test_context_parallel_full_fine_tune_equals_one_process(tiny_model_dir, tmp_path):
    """--context-parallel 2 on 2 gloo processes, full fine-tune, 2 steps of 2 sequences of exactly 256 tokens: the
    losses and the saved weights are the 1-process run's."""
    data = ["--synthetic-data", "--max-steps", "2"]
    reference, out = tmp_path / "reference", tmp_path / "cp"
    launch(1, context_parallel_args(tiny_model_dir, reference, 0, data), 29551)
    result = launch(2, context_parallel_args(tiny_model_dir, out, 0, data, context_parallel=2), 29552)
    assert "2 process(es) (context parallel 2)" in result.stdout
    rows = log(out)
    assert [(r["num_processes"], r["context_parallel"], r["tokens"]) for r in rows] == [(2, 2, 512)] * 2
    assert compare(reference, out)["max_abs_diff"] < 1e-4
    assert_same_weights(reference, out, tiny_model_dir)


def test_context_parallel_lora_resumes_and_equals_one_process(tiny_model_dir, tmp_path):
    """LoRA under --context-parallel 2 on GSM8K (padded batches, loss on the answer only, lengths not a multiple of
    2), stopped after step 1 and resumed: the loss curve and the merged model are the 1-process run's."""
    data = ["--train-file", str(shared_data("gsm8k", "train.jsonl")), "--limit", "40", "--max-steps", "3"]
    reference, out = tmp_path / "reference", tmp_path / "cp"
    launch(1, context_parallel_args(tiny_model_dir, reference, 4, data), 29553)
    launch(2, context_parallel_args(tiny_model_dir, out, 4, data, context_parallel=2, stop_after=1), 29554)
    state = json.loads((out / "checkpoints" / "step-1" / "trainer_state.json").read_text())
    assert (state["num_processes"], state["context_parallel"], state["global_batch"]) == (2, 2, 2)
    launch(2, context_parallel_args(tiny_model_dir, out, 4, data, context_parallel=2, resume_from="latest"), 29555)
    assert [r["step"] for r in log(out)] == [1, 2, 3]
    assert compare(reference, out)["max_abs_diff"] < 1e-4
    assert_same_weights(reference, out, tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="ppa")
    assert (model.config.ppa_p, model.config.ppa_window, model.config.ppa_sink_tokens) == (0.5, 16, 2)


def test_context_parallel_refuses_a_size_that_does_not_divide():
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from ppa_hf.recipes.training import make_context

    try:
        accelerator = Accelerator(cpu=True)
        assert make_context(SimpleNamespace(context_parallel=1), accelerator) is None
        with pytest.raises(ValueError, match=r"--context-parallel=2 does not divide the number of processes \(1\)"):
            make_context(SimpleNamespace(context_parallel=2), accelerator)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # no accelerator state left for later tests


def test_compare_loss_curves_reports_difference(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    a.write_text("".join(json.dumps({"step": s, "loss": 2.0 - 0.1 * s}) + "\n" for s in range(1, 6)))
    b.write_text("step,loss\n" + "".join(f"{s},{2.0 - 0.1 * s + (0.3 if s == 3 else 0.0)}\n" for s in range(1, 5)))
    result = subprocess.run([sys.executable, COMPARE, str(a), str(b)], capture_output=True, text=True)
    report = json.loads(result.stdout.splitlines()[0])
    assert result.returncode == 0 and report["at_step"] == 3 and report["max_abs_diff"] == pytest.approx(0.3)
    assert report["common_steps"] == 4 and report["only_in_a"] == 1
    failed = subprocess.run([sys.executable, COMPARE, str(a), str(b), "--tolerance", "0.1"], capture_output=True)
    assert failed.returncode == 1
    missing = subprocess.run([sys.executable, COMPARE, str(a), str(tmp_path / "x.jsonl")], capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "x.jsonl" in missing.stderr


def test_shipped_accelerate_configs():
    expected = {"cpu_1proc.yaml": "NO", "one_process.yaml": "NO", "cpu_2proc.yaml": "MULTI_GPU", "gpu_1.yaml": "NO", "gpu_ddp.yaml": "MULTI_GPU",
                "gpu_fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED"}
    for name, kind in expected.items():
        config = yaml.safe_load((CONFIGS / name).read_text())
        assert config["distributed_type"] == kind, name
    fsdp = yaml.safe_load((CONFIGS / "gpu_fsdp.yaml").read_text())
    assert fsdp["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["mixed_precision"] == "bf16"
    assert yaml.safe_load((CONFIGS / "deepspeed_zero2.yaml").read_text())["deepspeed_config"]["zero_stage"] == 2


def test_deepspeed_zero2_config_builds_plugin():
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (only needed for the ZeRO-2 config)")
    from accelerate.utils import DeepSpeedPlugin

    config = yaml.safe_load((CONFIGS / "deepspeed_zero2.yaml").read_text())["deepspeed_config"]
    plugin = DeepSpeedPlugin(zero_stage=config["zero_stage"], gradient_clipping=config["gradient_clipping"])
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 2
