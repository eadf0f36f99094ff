"""lm-evaluation-harness end to end on a tiny model, offline: `ppa-lm-eval` with the `ppa` model type and the
shipped GSM8K / MATH-500 tasks reading local JSONL; the same under `accelerate launch` with 2 CPU processes."""

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, SHARED_DATA, subprocess_env

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'ppa_hf[lm-eval]')")


def lm_eval(*args):
    return subprocess.run([sys.executable, "-m", "ppa_hf.recipes.lm_eval", *map(str, args)], capture_output=True,
                          text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=600)


TASKS = ("ppa_gsm8k", "ppa_math500", "ppa_hendrycks_math500")


def run_args(tiny_model_dir):
    # batch size 1 (lm-eval's default), spelled out: the 2-process test compares greedy answers
    return ["run", "--model", "ppa", "--model_args", f"pretrained={tiny_model_dir},ppa_p=0.5,ppa_window=8",
            "--tasks", ",".join(TASKS), "--limit", 3, "--batch_size", 1, "--gen_kwargs", "max_gen_toks=6",
            "--metadata", json.dumps({"data_dir": str(SHARED_DATA)}), "--log_samples"]


@pytest.fixture(scope="module")
def one_process_run(tiny_model_dir, tmp_path_factory):
    """One plain process over the three tasks (shared by the tests below: lm-eval starts slowly)."""
    out = tmp_path_factory.mktemp("lm_eval_one")
    return lm_eval(*run_args(tiny_model_dir), "--output_path", out), out


def samples_of(out, task):
    files = list(out.rglob(f"samples_{task}_*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def test_lm_eval_gsm8k_and_math500_tiny_model(one_process_run):
    result, out = one_process_run
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
    samples = samples_of(out, "ppa_math500")
    assert len(samples) == 3
    prompt = samples[0]["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.count("Problem:") == 5 and "Final Answer:" in prompt  # 4 fixed exemplars + the problem
    gsm = samples_of(out, "ppa_gsm8k")
    assert gsm[0]["doc"]["question"].startswith("Janet")  # the local test split


def test_lm_eval_two_processes_data_parallel(one_process_run, tiny_model_dir, tmp_path):
    """`ppa-lm-eval` under `accelerate launch`, 2 CPU processes (gloo): lm-eval's data-parallel mode (requests split
    by rank, gathered on rank 0). ppa_math500 (first-n exemplars) and ppa_hendrycks_math500 (0-shot) get the
    one-process prompts, so with batch size 1 the same greedy answers; ppa_gsm8k draws exemplars from a random
    stream each process walks alone, so only its documents are compared."""
    single_result, single_out = one_process_run
    assert single_result.returncode == 0, single_result.stderr[-4000:]
    out = tmp_path / "two"
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(REPO_ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port",
                          "29563", "-m", "ppa_hf.recipes.lm_eval", *map(str, run_args(tiny_model_dir)),
                          "--output_path", str(out)], capture_output=True, text=True, env=subprocess_env(),
                         cwd=REPO_ROOT, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "on rank 1" in two.stderr  # the second process built its own share of the requests
    assert len(list(out.rglob("results_*.json"))) == 1

    def by_doc(folder, task):
        # resps[0][0]: lm-eval pads the shorter share (3 = 2 + 1) with a copy of one of its requests and appends
        # that copy's answer to the same document's resps
        return {r["doc_id"]: (r["arguments"], r["resps"][0][0], r["filtered_resps"], r["exact_match"])
                for r in samples_of(folder, task)}

    for task in ("ppa_math500", "ppa_hendrycks_math500"):
        single, sharded = by_doc(single_out, task), by_doc(out, task)
        assert sorted(sharded) == [0, 1, 2] and all(first.strip() for _, first, _, _ in sharded.values())
        assert sharded == single, task
    assert sorted(by_doc(out, "ppa_gsm8k")) == [0, 1, 2]


def test_lm_eval_bad_p(tiny_model_dir, tmp_path):
    result = lm_eval("run", "--model", "ppa", "--model_args", f"pretrained={tiny_model_dir},ppa_p=2",
                     "--tasks", "ppa_gsm8k", "--limit", 1, "--metadata", json.dumps({"data_dir": str(SHARED_DATA)}),
                     "--output_path", tmp_path / "o")
    assert result.returncode == 2
    assert "ppa_p=2" in result.stderr.strip().splitlines()[-1]
    assert not list((tmp_path).rglob("results_*.json"))
