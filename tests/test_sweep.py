"""`ppa-hf sweep`: a 3-point sweep writes its CSV and S-curve plot, resumes, refuses changed settings."""

import csv
import json
import subprocess
import sys

from conftest import REPO_ROOT, shared_data, subprocess_env


def sweep(*args):
    return subprocess.run([sys.executable, "-m", "ppa_hf.cli", "sweep", *map(str, args)], capture_output=True,
                          text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=600)


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_three_point_sweep_csv_plot_and_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep"
    base = ["--ps", "0", "0.5", "1", "--model", tiny_model_dir, "--task", "gsm8k", "--limit", 4,
            "--max-new-tokens", 4, "--batch-size", 4, "--window", 8, "--data", shared_data("gsm8k", "test.jsonl"),
            "--out-dir", out]
    result = sweep(*base)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(out / "sweep.csv")
    assert [float(r["p"]) for r in rows] == [0.0, 0.5, 1.0]
    assert all(r["total"] == "4" and 0 <= float(r["accuracy"]) <= 1 and r["window"] == "8" for r in rows)
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # interrupted sweep: one point and the CSV missing -> only that point is recomputed
    (out / "points" / "p=0.5.json").unlink()
    (out / "sweep.csv").unlink()
    again = sweep(*base)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before") == 2 and "p=0.5: accuracy=" in again.stdout
    assert [float(r["p"]) for r in read_csv(out / "sweep.csv")] == [0.0, 0.5, 1.0]
    # the budget of a sweep is fixed
    changed = sweep(*[a if a != 4 else 5 for a in base])
    assert changed.returncode == 2 and "limit=4" in changed.stderr and "limit=5" in changed.stderr


def test_sweep_with_short_finetune_per_point(tiny_model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Numbers: " + " ".join(str(i % 17) for i in range(600)))
    out = tmp_path / "ft_sweep"
    result = sweep("--ps", "0.25", "1", "--model", tiny_model_dir, "--task", "perplexity", "--data", text,
                   "--context", 64, "--max-windows", 4, "--finetune-steps", 2, "--train-file",
                   shared_data("gsm8k", "train.jsonl"), "--seq-len", 64, "--train-batch-size", 2, "--lr", "1e-3",
                   "--out-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(out / "sweep.csv")
    assert [float(r["p"]) for r in rows] == [0.25, 1.0] and all(float(r["ppl"]) > 1 for r in rows)
    for p in ("0.25", "1"):
        config = (out / "finetune" / f"p={p}" / "config.json").read_text()
        assert f'"ppa_p": {p}' in config


def test_sweep_finetunes_at_the_pattern_it_evaluates(tiny_model_dir, tmp_path):
    """The per-p fine-tune gets the sweep's whole PPA setting: a block-64 sweep trains at block 64 (it used to
    train at the default block 128 and backend, then evaluate at 64)."""
    text = tmp_path / "t.txt"
    text.write_text("Numbers: " + " ".join(str(i % 13) for i in range(400)))
    out = tmp_path / "block_sweep"
    result = sweep("--ps", "0.5", "--model", tiny_model_dir, "--task", "perplexity", "--data", text, "--context", 64,
                   "--max-windows", 2, "--granularity", "block", "--block-size", 64, "--backend", "sdpa_mask",
                   "--window", 16, "--sink-tokens", 1, "--finetune-steps", 1, "--train-file",
                   shared_data("gsm8k", "train.jsonl"), "--seq-len", 64, "--train-batch-size", 2, "--out-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "finetune" / "p=0.5" / "config.json").read_text())
    assert {k: config[k] for k in ("ppa_p", "ppa_granularity", "ppa_block_size", "ppa_backend", "ppa_window",
                                   "ppa_sink_tokens")} == {"ppa_p": 0.5, "ppa_granularity": "block",
                                                            "ppa_block_size": 64, "ppa_backend": "sdpa_mask",
                                                            "ppa_window": 16, "ppa_sink_tokens": 1}
    point = json.loads((out / "points" / "p=0.5.json").read_text())
    assert (point["ppa_granularity"], point["ppa_block_size"], point["ppa_window"]) == ("block", 64, 16)


def test_sweep_bad_input(tmp_path, capsys):
    from ppa_hf.cli import main

    cases = [(["--ps", "0.5", "2", "--task", "gsm8k"], "--ps=2"), (["--ps", "0.5", "--task", "nope"], "--task='nope'"),
             (["--ps", "0.5", "--task", "gsm8k", "--data", str(tmp_path / "x.jsonl")], "--data"),
             (["--ps", "0.5", "0.5", "--task", "gsm8k"], "repeats")]
    for i, (args, expect) in enumerate(cases):
        assert main(["sweep", *args, "--out-dir", str(tmp_path / str(i))]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], lines
        assert not (tmp_path / str(i) / "sweep.csv").exists()


def test_sweep_with_finetune_under_two_processes(tiny_model_dir, tmp_path):
    """A fine-tuning sweep under `accelerate launch` of 2 CPU processes: each point is fine-tuned data parallel over
    both, then evaluated sharded over the same process group (the fine-tune leaves it up). With the same global
    batch (2 per process x 2 against 4 in one process) the perplexities equal the one-process sweep's up to the
    reduction order of two replicas."""
    text = tmp_path / "t.txt"
    text.write_text("Numbers: " + " ".join(str(i % 17) for i in range(600)))
    args = ["sweep", "--ps", "0.25", "1", "--model", tiny_model_dir, "--task", "perplexity", "--data", text,
            "--context", 64, "--max-windows", 4, "--finetune-steps", 2, "--train-file",
            shared_data("gsm8k", "train.jsonl"), "--seq-len", 64, "--lr", "1e-3"]
    one = sweep(*args[1:], "--train-batch-size", 4, "--out-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(REPO_ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml"),
                          "--main_process_port", "29581", "-m", "ppa_hf.cli", *map(str, args), "--train-batch-size",
                          "2", "--out-dir", str(tmp_path / "two")], capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT,
                         timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    rows_one, rows_two = read_csv(tmp_path / "one" / "sweep.csv"), read_csv(tmp_path / "two" / "sweep.csv")
    assert [r["p"] for r in rows_two] == [r["p"] for r in rows_one] and len(rows_two) == 2
    for a, b in zip(rows_one, rows_two):
        assert abs(float(a["nll"]) - float(b["nll"])) <= 1e-4, (a, b)
    point = json.loads((tmp_path / "two" / "points" / "p=0.25.json").read_text())
    assert point["num_processes"] == 2
