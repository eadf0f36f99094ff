"""`ppa-hf eval`: GSM8K / MATH-500 on 20 problems (tiny model; one run on the real SmolLM2), strided
perplexity, the shipped `evaluate` metric, and bad input."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ppa_hf
from conftest import REPO_ROOT, shared_data, subprocess_env
from ppa_hf.recipes.evaluation import run_eval, samples_path
from ppa_hf.recipes.perplexity import perplexity


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ppa_hf.cli", "eval", *map(str, args)], capture_output=True,
                          text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=timeout)


def check_outputs(output, task, n):
    summary = json.loads(output.read_text())
    rows = [json.loads(line) for line in open(samples_path(str(output)))]
    assert len(rows) == n == summary["total"]
    for row in rows:
        assert set(row) >= {"prompt", "generation", "answer", "gold", "correct"}
        assert isinstance(row["correct"], bool)
        marker = "Question:" if task == "gsm8k" else "Problem:"
        assert row["prompt"].count(marker) == 5  # 4 shots + the problem
        assert marker not in row["generation"]  # generation stops at the next question
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / n)
    assert 0 <= summary["accuracy"] <= 1
    return summary, rows


@pytest.mark.parametrize("task,data", [("gsm8k", ("gsm8k", "test.jsonl")), ("math500", ("math500", "test.jsonl"))])
def test_eval_cli_20_problems_tiny_model(task, data, tiny_model_dir, tmp_path):
    output = tmp_path / f"{task}.json"
    result = cli("--model", tiny_model_dir, "--p", "0.5", "--task", task, "--data", shared_data(*data),
                 "--limit", 20, "--batch-size", 10, "--max-new-tokens", 6, "--output", output)
    assert result.returncode == 0, result.stderr[-3000:]
    summary, rows = check_outputs(output, task, 20)
    assert summary["ppa_p"] == 0.5 and summary["shots"] == 4
    assert '"accuracy"' in result.stdout
    assert f"{task}:  50%" in result.stderr and "10/20" in result.stderr  # progress counts problems, not batches
    golds = [r["gold"] for r in rows]
    assert golds[0] == ("18" if task == "gsm8k" else r"\left( 3, \frac{\pi}{2} \right)")  # first test problems
    assert not any(g is None or g == "" for g in golds)


def test_eval_real_smollm2_gsm8k(tmp_path):
    """The embedded SmolLM2-135M-Instruct, p = 0.75, 20 GSM8K problems (few new tokens: CI time)."""
    output = tmp_path / "real.json"
    summary = run_eval(task="gsm8k", p=0.75, data=str(shared_data("gsm8k", "test.jsonl")), limit=20,
                       batch_size=20, max_new_tokens=6, output=str(output), progress=False)
    check_outputs(output, "gsm8k", 20)
    assert summary["model"].startswith("SmolLM2")
    rows = [json.loads(line) for line in open(samples_path(str(output)))]
    assert all(r["generation"].strip() for r in rows), [r["generation"] for r in rows]
    assert summary["ppa_p"] == 0.75 and summary["ppa_window"] == 64


def test_metric_module_offline():
    from ppa_hf.recipes.metrics import load_metric

    math_metric = load_metric("math")
    result = math_metric.compute(predictions=[r"so $\boxed{\dfrac{1}{2}}$", r"\boxed{3}", "no idea"],
                                 references=[r"\frac12", "4", "5"])
    assert result == {"accuracy": pytest.approx(1 / 3), "correct": 1, "total": 3, "extracted": pytest.approx(2 / 3)}
    gsm = load_metric("gsm8k_strict").compute(predictions=["so 5\n#### 5", "5 apples"], references=["#### 5", "5"])
    assert gsm["correct"] == 1
    with pytest.raises(ValueError, match="gsm8k, gsm8k_strict, math"):
        load_metric("mmlu")


def _tiny(tiny_model_dir, p=0.5):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ppa_hf.apply(model, p=p, window=16)
    return model, tok


def _reference_nll(model, ids, context, stride):
    """Per-token loss with each token scored once, by the first window whose end covers it: one window at a time,
    one target at a time (what the batched implementation must reproduce)."""
    total, count, scored_until = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - context + 1, stride):
            window = ids[start:start + context]
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0].float(), -1)  # [context, V]
            for pos in range(max(scored_until, start + 1), start + context):  # token `pos` from tokens before it
                total -= float(logp[pos - start - 1, window[pos - start]])
                count += 1
            scored_until = start + context
    return total / count, count


def test_strided_perplexity(tiny_model_dir):
    model, tok = _tiny(tiny_model_dir)
    text = "def f(x):\n    return x * 2\n" * 40
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel()
    plain = perplexity(model, tok, text, context=64)
    assert plain["stride"] == 64 and plain["windows"] == n // 64 and plain["tokens"] == 63 * (n // 64)
    assert perplexity(model, tok, text, context=64, stride=64) == plain  # stride == context: the same windows
    strided = perplexity(model, tok, text, context=64, stride=16)
    windows = (n - 64) // 16 + 1
    assert strided["windows"] == windows
    assert strided["tokens"] == 63 + 16 * (windows - 1)  # every token scored once
    assert math.isfinite(strided["nll"]) and strided["ppl"] == pytest.approx(math.exp(strided["nll"]))
    for result, stride in [(plain, 64), (strided, 16)]:
        nll, count = _reference_nll(model, ids, 64, stride)
        assert result["tokens"] == count and result["nll"] == pytest.approx(nll, rel=1e-5)
    # batching windows (the first one scores more targets than the later ones) changes nothing
    batched = perplexity(model, tok, text, context=64, stride=16, batch_size=3)
    assert batched["tokens"] == strided["tokens"] and batched["nll"] == pytest.approx(strided["nll"], rel=1e-5)
    assert perplexity(model, tok, text, context=64, stride=16, max_windows=2)["tokens"] == 63 + 16
    for bad, match in [(dict(stride=65), "--stride=65"), (dict(stride=0), "--stride=0"), (dict(context=1), "--context"),
                       (dict(context=10 * n), "fewer than one window")]:
        with pytest.raises(ValueError, match=match):
            perplexity(model, tok, text, **{"context": 64, **bad})


def test_perplexity_cli(tiny_model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    output = tmp_path / "ppl.json"
    result = cli("--model", tiny_model_dir, "--p", 0.75, "--task", "perplexity", "--data", text, "--context", 128,
                 "--stride", 64, "--output", output)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(output.read_text())
    assert summary["stride"] == 64 and summary["context"] == 128 and summary["tokens"] > 0
    assert summary["ppl"] > 1 and not (tmp_path / "ppl.samples.jsonl").exists()


def test_saved_p_used_when_p_omitted(tiny_model_dir, tmp_path):
    model, tok = _tiny(tiny_model_dir, p=0.25)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    summary = run_eval(task="gsm8k", model=str(tmp_path / "m"), data=str(shared_data("gsm8k", "test.jsonl")),
                       limit=2, max_new_tokens=2, progress=False)
    assert summary["ppa_p"] == 0.25 and summary["ppa_window"] == 16
    with pytest.raises(ValueError, match="--p"):
        run_eval(task="gsm8k", model=str(tiny_model_dir), data=str(shared_data("gsm8k", "test.jsonl")), limit=2)


@pytest.mark.parametrize("case", ["missing_data", "wrong_fields", "p_2", "unknown_task", "fields_of_other_task",
                                  "missing_text"])
def test_bad_input(case, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "out" / "r.json"
    args = ["--model", tiny_model_dir, "--p", "0.5", "--task", "gsm8k", "--limit", 2, "--output", output,
            "--data", shared_data("gsm8k", "test.jsonl")]
    if case == "missing_data":
        args[-1], expect = tmp_path / "none.jsonl", "--data"
    elif case == "wrong_fields":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"q": 1, "a": 2}\n')
        args[-1], expect = bad, "fields"
    elif case == "p_2":
        args[args.index("--p") + 1], expect = "2", "--p=2"
    elif case == "unknown_task":
        args[args.index("--task") + 1], expect = "mmlu", "--task='mmlu'"
    elif case == "missing_text":
        args[args.index("--task") + 1] = "perplexity"
        args[-1], expect = tmp_path / "none.txt", "--data"
    else:
        args[args.index("--task") + 1], expect = "math500", "math records were expected"
    if case == "p_2":  # one case through a real subprocess: the exit code of the command itself
        result = cli(*args)
        code, stderr = result.returncode, result.stderr
    else:  # the others in-process (same main(), no interpreter start-up)
        from ppa_hf.cli import main

        code = main(["eval", *map(str, args)])
        stderr = capsys.readouterr().err
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and expect in lines[0], stderr[-2000:]
    assert not output.exists() and not (tmp_path / "out" / "r.samples.jsonl").exists()


def test_backend_and_granularity_flags(tiny_model_dir, tmp_path):
    """--backend/--granularity reach the model; a loaded model re-applied at a new p keeps what it was given."""
    from ppa_hf.cli import main
    from ppa_hf.recipes.evaluation import load_eval_model

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    output = tmp_path / "ppl.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--p", "0.5", "--task", "perplexity", "--data", str(text),
                 "--context", "96", "--backend", "sdpa_mask", "--granularity", "block", "--block-size", "16",
                 "--output", str(output)]) == 0
    summary = json.loads(output.read_text())
    assert summary["ppa_granularity"] == "block"
    loaded = load_eval_model(str(tiny_model_dir), p=0.5, backend="sdpa_mask", granularity="block", block_size=16,
                             device="cpu")
    config = loaded[0].config
    assert (config.ppa_backend, config.ppa_granularity, config.ppa_block_size) == ("sdpa_mask", "block", 16)
    again = run_eval(task="perplexity", data=str(text), p=0.75, context=96, loaded=loaded, progress=False)
    assert again["ppa_p"] == 0.75 and again["ppa_granularity"] == "block"
    assert (config.ppa_backend, config.ppa_block_size) == ("sdpa_mask", 16)
    with pytest.raises(ValueError, match="block_size"):
        load_eval_model(str(tiny_model_dir), p=0.5, block_size=0, device="cpu")
