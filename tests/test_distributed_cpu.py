"""Multi-process fine-tuning on CPU (DDP over gloo) through `accelerate launch`, checkpoints resumed across
process counts (2 -> 1 and 1 -> 2), loss-curve logs compared with examples/compare_loss_curves.py, and the
shipped accelerate configs."""

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
    expected = {"cpu_1proc.yaml": "NO", "cpu_2proc.yaml": "MULTI_GPU", "gpu_1.yaml": "NO", "gpu_ddp.yaml": "MULTI_GPU",
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
