"""Evaluation under `accelerate launch` with 2 CPU processes (gloo): `ppa-hf eval` (GSM8K, perplexity),
and `ppa-hf sweep` give the single-process results, one set of files, written by the main process
(`ppa-lm-eval` under the launcher: tests/test_lm_eval.py)."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, shared_data, subprocess_env

CPU_2PROC = str(REPO_ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml")


def run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def one_process(module, *args):
    return run([sys.executable, "-m", module, *map(str, args)])


def two_processes(port, program, *args):
    """``accelerate launch`` of 2 CPU processes; ``program``: ``["-m", module]`` or ``["--no_python", command]``."""
    return run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC,
                "--main_process_port", str(port), *program, *map(str, args)])


def json_lines(path):
    return [json.loads(line) for line in open(path)]


def test_gsm8k_two_processes_equal_one(tiny_model_dir, tmp_path):
    # 4 problems in batches of 2: each process runs one of the single-process batches (same left padding)
    args = ["eval", "--model", tiny_model_dir, "--p", 0.5, "--window", 8, "--task", "gsm8k", "--data",
            shared_data("gsm8k", "test.jsonl"), "--limit", 4, "--batch-size", 2, "--max-new-tokens", 6]
    one_process("ppa_hf.cli", *args, "--output", tmp_path / "one.json")
    two = two_processes(29561, ["-m", "ppa_hf.cli"], *args, "--output", tmp_path / "two.json")
    single, sharded = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (single["num_processes"], single["problems_per_process"]) == (1, [4])
    assert (sharded["num_processes"], sharded["problems_per_process"]) == (2, [2, 2])
    for key in ("accuracy", "correct", "total", "accuracy_flexible", "accuracy_strict", "extracted_flexible"):
        assert sharded[key] == single[key], key
    rows_single, rows_sharded = (json_lines(tmp_path / f"{n}.samples.jsonl") for n in ("one", "two"))
    assert len(rows_sharded) == 4 and all(r["generation"].strip() for r in rows_sharded)  # not a vacuous equality
    assert rows_sharded == rows_single  # the same generations, in problem order
    assert [r["gold"] for r in rows_sharded][0] == "18"  # the first test problem first
    # only the main process prints and writes
    assert two.stdout.count('"accuracy"') == 1 and two.stdout.count("wrote ") == 1
    assert '"problems_per_process": [2, 2]' in two.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "one.samples.jsonl", "two.json",
                                                          "two.samples.jsonl"]


def test_perplexity_sweep_two_processes_equal_one(tiny_model_dir, tmp_path):
    """A perplexity sweep over 2 points: 5 windows shared 3 + 2, the losses summed in window order, so the
    per-token loss is the single-process one to the bit. Launched through the installed `ppa-hf` when there is
    one (the command under the launcher), else the module."""
    text = tmp_path / "text.txt"
    text.write_text("Numbers and words: " + " ".join(f"w{i % 23} {i % 7}" for i in range(400)))
    args = ["sweep", "--ps", 0.5, 1, "--model", tiny_model_dir, "--window", 8, "--task", "perplexity", "--data", text,
            "--context", 48, "--max-windows", 5]
    one_process("ppa_hf.cli", *args, "--out-dir", tmp_path / "one")
    program = ["--no_python", "ppa-hf"] if shutil.which("ppa-hf") else ["-m", "ppa_hf.cli"]
    two = two_processes(29562, program, *args, "--out-dir", tmp_path / "two")
    assert two.stdout.count("wrote ") == 2 and two.stdout.count("p=0.5: ppl=") == 1  # the main process's lines
    for p in ("0.5", "1"):
        single, sharded = (json.loads((tmp_path / n / "points" / f"p={p}.json").read_text()) for n in ("one", "two"))
        assert (sharded["num_processes"], sharded["windows_per_process"]) == (2, [3, 2])
        assert (single["num_processes"], single["windows_per_process"]) == (1, [5])
        assert sharded["windows"] == single["windows"] == 5 and sharded["tokens"] == single["tokens"]
        assert sharded["nll"] == single["nll"]  # exact: the same per-window sums, added in the same order
    assert [line.split(",")[:5] for line in (tmp_path / "two" / "sweep.csv").read_text().splitlines()] == \
        [line.split(",")[:5] for line in (tmp_path / "one" / "sweep.csv").read_text().splitlines()]


def test_batches_are_shared_whole(monkeypatch):
    """Without a launch: the batch arithmetic each process does alone (no communication)."""
    from ppa_hf.recipes import sharding

    order = [4, 0, 3, 1, 2]  # e.g. prompts longest first
    assert sharding.batches(order, 2) == [[4, 0], [3, 1], [2]]
    monkeypatch.setattr(sharding, "num_processes", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(sharding, "process_index", lambda rank=rank: rank)
        shares.append(sharding.my_batches(order, 2))
    assert shares == [[[4, 0], [2]], [[3, 1]]]  # each a batch of the one-process run
    assert sharding.items_per_process(5, 2) == [3, 2] and sharding.items_per_process(1, 2) == [1, 0]
    assert sharding.gather_in_order([(1, "b"), (0, "a")], 2) == ["a", "b"]  # one process: no transport
    with pytest.raises(RuntimeError, match="expected each of 0..2 once"):
        sharding.gather_in_order([(0, "a"), (0, "a"), (2, "c")], 3)


FAILING_SCRIPT = """
import sys
from ppa_hf.recipes.sharding import process_index, run_everywhere
def work():
    if process_index() == 1:
        raise ValueError("process one broke")
    return "fine"
try:
    run_everywhere(work)
except Exception as err:
    print(f"rank {process_index()} raised {type(err).__name__}: {err}", flush=True)
    sys.exit(3)
print(f"rank {process_index()} returned", flush=True)
"""


def test_a_failure_on_one_process_stops_every_process(tmp_path):
    # without the shared failure report, process 0 would wait in the next collective until gloo's timeout
    script = tmp_path / "fail.py"
    script.write_text(FAILING_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC,
                             "--main_process_port", "29571", str(script)], capture_output=True, text=True,
                            env=subprocess_env(), cwd=REPO_ROOT, timeout=120)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "rank 1 raised ValueError: process one broke" in out
    assert "rank 0 raised RuntimeError: stopped because another process failed: process 1: ValueError: " \
           "process one broke" in out
    assert "returned" not in result.stdout
