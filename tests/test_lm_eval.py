"""lm-evaluation-harness end to end on a tiny model, offline: `ppa-lm-eval` with the `ppa` model type and the
shipped GSM8K / MATH-500 tasks reading local JSONL."""

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, SHARED_DATA, subprocess_env

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'ppa_hf[lm-eval]')")


def lm_eval(*args):
    return subprocess.run([sys.executable, "-m", "ppa_hf.recipes.lm_eval", *map(str, args)], capture_output=True,
                          text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=600)


def test_lm_eval_gsm8k_and_math500_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "lm_eval"
    result = lm_eval("run", "--model", "ppa", "--model_args", f"pretrained={tiny_model_dir},ppa_p=0.5,ppa_window=8",
                     "--tasks", "ppa_gsm8k,ppa_math500,ppa_hendrycks_math500", "--limit", 3, "--gen_kwargs",
                     "max_gen_toks=6", "--metadata", json.dumps({"data_dir": str(SHARED_DATA)}),
                     "--output_path", out, "--log_samples")
    assert result.returncode == 0, result.stderr[-4000:]
    results_files = list(out.rglob("results_*.json"))
    assert len(results_files) == 1
    results = json.loads(results_files[0].read_text())
    assert set(results["results"]) == {"ppa_gsm8k", "ppa_math500", "ppa_hendrycks_math500"}
    assert "exact_match,flexible-extract" in results["results"]["ppa_gsm8k"]
    assert "exact_match,none" in results["results"]["ppa_math500"]
    assert results["n-shot"]["ppa_gsm8k"] == 4 and results["n-shot"]["ppa_math500"] == 4
    assert "ppa_p=0.5" in str(results["config"]["model_args"]).replace("'", "").replace(": ", "=") or \
        results["config"]["model_args"].get("ppa_p") == 0.5
    samples = [json.loads(line) for line in next(out.rglob("samples_ppa_math500_*.jsonl")).read_text().splitlines()]
    assert len(samples) == 3
    prompt = samples[0]["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.count("Problem:") == 5 and "Final Answer:" in prompt  # 4 fixed exemplars + the problem
    gsm = [json.loads(line) for line in next(out.rglob("samples_ppa_gsm8k_*.jsonl")).read_text().splitlines()]
    assert gsm[0]["doc"]["question"].startswith("Janet")  # the local test split


def test_lm_eval_bad_p(tiny_model_dir, tmp_path):
    result = lm_eval("run", "--model", "ppa", "--model_args", f"pretrained={tiny_model_dir},ppa_p=2",
                     "--tasks", "ppa_gsm8k", "--limit", 1, "--metadata", json.dumps({"data_dir": str(SHARED_DATA)}),
                     "--output_path", tmp_path / "o")
    assert result.returncode == 2
    assert "ppa_p=2" in result.stderr.strip().splitlines()[-1]
    assert not list((tmp_path).rglob("results_*.json"))
