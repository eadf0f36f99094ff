"""examples/finetune.py: a short fine-tune through `accelerate launch`, resume, and bad input (tiny models)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import ppa_hf
from conftest import REPO_ROOT, run_finetune, shared_data

CPU_1 = str(REPO_ROOT / "examples" / "accelerate_configs" / "cpu_1proc.yaml")
ONE_PROCESS = str(REPO_ROOT / "examples" / "accelerate_configs" / "one_process.yaml")
# messages the README's fine-tune command used to print (accelerate's launcher defaults, a tied weight dropped by
# accelerate's checkpoint writer, PEFT looking for a GGUF base model's config.json, a deprecated Transformers API)
NOISE = ("had defaults used instead", "Removed shared tensor", "Could not find a config file",
         "is deprecated", "Warning", "warn(")


def common(model, out, **extra):
    args = ["--model", str(model), "--train-file", str(shared_data("gsm8k", "train.jsonl")), "--output-dir",
            str(out), "--seq-len", "96", "--batch-size", "2", "--limit", "48", "--no-progress", "--p", "0.5",
            "--window", "16"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def log_rows(out):
    with open(out / "train_log.jsonl") as handle:
        return [json.loads(line) for line in handle]


def test_three_steps_through_accelerate_launch(tiny_model_dir, tmp_path):
    out = tmp_path / "ft"
    result = run_finetune(common(tiny_model_dir, out, max_steps=3, lora_r=0, lr=1e-3),
                          launcher=("accelerate", "--config_file", CPU_1))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = log_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="ppa")
    assert model.config.ppa_p == 0.5 and model.config.ppa_window == 16
    assert model.config._attn_implementation == "ppa"
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])]
    assert changed, "fine-tuning changed no weight"
    ids = torch.randint(0, 1000, (1, 40))
    assert torch.isfinite(model(ids).logits).all()


def test_resume_continues_step_count_and_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run_finetune(common(tiny_model_dir, straight, max_steps=4, lora_r=4, lr=1e-2)).returncode == 0
    first = run_finetune(common(tiny_model_dir, broken, max_steps=4, lora_r=4, lr=1e-2, stop_after=2))
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (broken / "config.json").exists(), "an interrupted run must not write a final model"
    assert (broken / "checkpoints" / "step-2" / "trainer_state.json").exists()
    second = run_finetune(common(tiny_model_dir, broken, max_steps=4, lora_r=4, lr=1e-2, resume_from="latest"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 2" in second.stdout
    rows = log_rows(broken)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    reference = log_rows(straight)
    for a, b in zip(rows, reference):  # same data order, optimizer, scheduler and RNG state after resume
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["lr"] == pytest.approx(b["lr"])
    assert (broken / "adapter" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(broken, attn_implementation="ppa")
    assert model.config.ppa_p == 0.5
    resumed = dict(model.named_parameters())
    for name, param in AutoModelForCausalLM.from_pretrained(straight).named_parameters():
        assert torch.allclose(param, resumed[name], atol=1e-5), name


@pytest.mark.parametrize("case", ["missing_file", "wrong_fields", "p_out_of_range", "bad_steps"])
def test_bad_input_one_line_nonzero_nothing_written(case, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = common(tiny_model_dir, out, max_steps=2)
    if case == "missing_file":
        args[args.index("--train-file") + 1] = str(tmp_path / "nope.jsonl")
        expect = "--train-file"
    elif case == "wrong_fields":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "a", "completion": "b"}\n')
        args[args.index("--train-file") + 1] = str(bad)
        expect = "fields"
    elif case == "p_out_of_range":
        args[args.index("--p") + 1] = "2"
        expect = "--p=2"
    else:
        args += ["--max-steps", "0"]
        expect = "--max-steps"
    result = run_finetune(args)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and expect in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (out / "config.json").exists() and not (out / "checkpoints").exists()


def test_random_init_synthetic_gradient_checkpointing(tiny_model_dir, tmp_path):
    """Throughput-run options: random-init model shape, synthetic data, activation checkpointing, grad accum; the
    block pattern with its block size and backend reaches the model and its saved config."""
    out = tmp_path / "syn"
    result = run_finetune(["--model-config", "tiny-llama", "--tokenizer", str(tiny_model_dir), "--synthetic-data",
                           "--seq-len", "64", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "2",
                           "--lora-r", "0", "--gradient-checkpointing", "--p", "0.25", "--output-dir", str(out),
                           "--no-progress", "--granularity", "block", "--block-size", "16", "--backend", "naive"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = log_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["tokens"] == 4 * 64 and r["global_batch"] == 4 for r in rows)
    config = AutoModelForCausalLM.from_pretrained(out, attn_implementation="ppa").config
    assert config.ppa_p == 0.25 and (config.ppa_granularity, config.ppa_block_size) == ("block", 16)
    assert config.ppa_backend == "sdpa_mask"  # the old name is read as the new one


def test_embedded_smollm2_lora_two_steps_saves_a_loadable_model(tmp_path):
    """The default model (SmolLM2 from GGUF, tied embeddings) through the README's `accelerate launch` form: LoRA,
    activation checkpointing, a checkpoint per step, 2 steps; the merged output loads with its p (the GGUF quantizer
    used to make the fine-tuned model unsavable), and nothing but the run's own lines is printed (no warning)."""
    out = tmp_path / "ft"
    args = ["--train-file", str(shared_data("gsm8k", "train.jsonl")), "--output-dir", str(out), "--seq-len", "64",
            "--batch-size", "1", "--limit", "8", "--no-progress", "--p", "0.75", "--max-steps", "2",
            "--lora-r", "4", "--save-every", "1", "--gradient-checkpointing"]
    result = run_finetune(args, launcher=("accelerate", "--config_file", ONE_PROCESS))
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert not [noise for noise in NOISE if noise in printed], printed[-4000:]
    from safetensors import safe_open

    with safe_open(str(out / "checkpoints" / "step-2" / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())  # the tied embedding / LM head stored once, under the embedding's name
    assert "base_model.model.model.embed_tokens.weight" in names and "base_model.model.lm_head.weight" not in names
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="ppa")
    assert model.config.ppa_p == 0.75 and model.config.num_hidden_layers == 30
    assert [r["step"] for r in log_rows(out)] == [1, 2]


def test_train_loop_on_in_memory_batches_matches_a_plain_loop(tiny_model_dir):
    """Other loops (examples/results.py's passkey fine-tune) run the fine-tune's own step on batches built in
    memory: the result is the plain PyTorch loop that results.py had before (Transformers' loss on the labelled
    tokens only, AdamW, gradient norm clipped at 1, a LambdaLR schedule), step for step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from ppa_hf.recipes.training import make_optimizer, target_count, train_loop

    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(3):
        ids = torch.randint(0, 1000, (2, 24), generator=g)  # [B, T]
        labels = ids.clone()
        labels[:, :20] = -100  # loss on the last tokens only, as on a passkey
        labels[1, 20] = -100  # rows with different target counts: the mean is over tokens, not rows
        data.append((ids, labels))

    def schedule(step):
        return min(1.0, (step + 1) / 2) * max(0.0, 1 - step / 3)

    def fresh():
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        return ppa_hf.apply(model, p=0.5, window=8)

    reference = fresh().train()
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    expected = []
    for ids, labels in data:
        loss = reference(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        expected.append(float(loss.detach()))

    model = fresh()
    opt = make_optimizer(model, 1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    try:
        rows = train_loop(Accelerator(cpu=True), model, opt, sched,
                          lambda step: ([{"input_ids": data[step][0], "labels": data[step][1]}],
                                        target_count(data[step][1])),
                          last_step=3, global_batch=2)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # no accelerator state left for later tests
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["tokens"] for r in rows] == [48, 48, 48]
    assert [r["loss"] for r in rows] == pytest.approx(expected, abs=2e-6)
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 * schedule(s) for s in range(3)])
    trained = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        assert torch.allclose(param, trained[name], atol=1e-6), name
    assert not torch.equal(trained["lm_head.weight"], fresh().lm_head.weight)


def test_materialize_optimizer_state_changes_no_weight():
    """The optimizer state is created before a resume (so accelerate's FSDP loader has somewhere to put it) by a
    zero-gradient step at learning rate 0: weights bitwise unchanged (weight decay too), lr restored, no grads."""
    from ppa_hf.recipes.training import materialize_optimizer_state, optimizer_step_count

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[1].weight.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    assert optimizer_step_count(optimizer) is None
    materialize_optimizer_state(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(optimizer.state) == 3 and optimizer_step_count(optimizer) == 1
    assert optimizer.param_groups[0]["lr"] == 1e-2 and all(p.grad is None for p in model.parameters())


def test_resume_refuses_an_optimizer_state_that_was_not_restored(tiny_model_dir, tmp_path):
    """A checkpoint records its optimizer step count; a resume whose optimizer does not come back with it (what
    accelerate's sharded FSDP loader did silently) stops with an error instead of training on fresh moments."""
    out = tmp_path / "ft"
    result = run_finetune(common(tiny_model_dir, out, max_steps=2, lora_r=0))
    assert result.returncode == 0, result.stderr[-3000:]
    state_file = out / "checkpoints" / "step-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["optimizer_steps"] == 2
    state_file.write_text(json.dumps({**state, "optimizer_steps": 5}))
    result = run_finetune(common(tiny_model_dir, out, max_steps=3, lora_r=0, resume_from="latest"))
    assert result.returncode != 0
    assert "the optimizer state was not restored (its step count is 2, the checkpoint's 5)" in result.stderr


def test_no_save_writes_only_the_train_log(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    result = run_finetune(["--model-config", "tiny-llama", "--tokenizer", str(tiny_model_dir), "--synthetic-data",
                           "--seq-len", "32", "--max-steps", "2", "--lora-r", "0", "--no-save", "--output-dir",
                           str(out), "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["run_args.json", "train_log.jsonl"]
    assert [r["step"] for r in log_rows(out)] == [1, 2]
    result = run_finetune(["--model-config", "tiny-llama", "--no-save", "--save-every", "1", "--output-dir",
                           str(tmp_path / "x")])
    assert result.returncode == 2 and "--no-save" in result.stderr and "--save-every" in result.stderr


def test_tied_weights_saved_once_from_a_gathered_state_dict(tmp_path):
    """FSDP gathers a tied embedding as two separate tensors; the final save keeps one and reloads tied."""
    from transformers import LlamaConfig

    from ppa_hf.recipes.training import drop_tied_copies

    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    gathered = {name: tensor.clone() for name, tensor in model.state_dict().items()}  # as FSDP returns them
    kept = drop_tied_copies(model, gathered)
    assert "lm_head.weight" in gathered and "lm_head.weight" not in kept
    assert set(gathered) - set(kept) == {"lm_head.weight"}
    model.save_pretrained(tmp_path, state_dict=kept)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    ids = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)
    untied = AutoModelForCausalLM.from_config(LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": False}))
    assert drop_tied_copies(untied, untied.state_dict()).keys() == untied.state_dict().keys()


def test_results_scurve_smoke_embedded_smollm2(tmp_path):
    """examples/results.py scurve end to end at toy size on the embedded SmolLM2 (its passkey fine-tune runs
    through the training module's loop): one p, 2 steps, a CSV row with the loss and the held-out perplexity."""
    import csv
    import math
    import subprocess
    import sys

    from conftest import subprocess_env

    out = tmp_path / "scurve"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "results.py"), "scurve", "--out-dir",
                             str(out), "--ps", "0.5", "--context", "96", "--steps", "2", "--batch-size", "2",
                             "--eval-samples", "2", "--eval-batch", "2", "--ppl-windows", "1", "--window", "16"],
                            capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "scurve.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["p"] == "0.5" and rows[0]["steps"] == "2" and rows[0]["window"] == "16"
    assert 0 < float(rows[0]["final_loss"]) < 20 and math.isfinite(float(rows[0]["heldout_ppl"]))
    assert (out / "scurve_passkey_acc.png").exists()
