"""benchmarks/eval_workload.py on CPU: the script runs end to end on GSM8K prompts with the embedded model, and PPA at
p = 1 gives sdpa's generations while p = 0.5 is compared, not assumed equal."""

import csv
import json
import os

import pytest

from benchmarks import eval_workload

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k", "test.jsonl")


def test_eval_workload_rows_and_p1_equality(tmp_path, monkeypatch):
    order = []
    use_impl = eval_workload.use_impl
    monkeypatch.setattr(eval_workload, "use_impl", lambda model, impl, gran, p: (order.append((impl, gran, p)),
                                                                                use_impl(model, impl, gran, p)))
    rows = eval_workload.main(["--data", DATA, "--out", str(tmp_path), "--limit", "2", "--batch-size", "2",
                               "--max-new-tokens", "3", "--device", "cpu", "--rounds", "2",
                               "--impls", "sdpa", "ppa:token:1", "ppa:token:0.5"])
    assert [(r["impl"], r["granularity"], r["p"]) for r in rows] == [("sdpa", "dense", 1.0), ("ppa", "token", 1.0),
                                                                     ("ppa", "token", 0.5)]
    # untimed runs, then round 1 from sdpa, round 2 one implementation further along (none always runs first)
    assert [o[2] for o in order] == [None, 1.0, 0.5, None, 1.0, 0.5, 1.0, 0.5, None]
    assert rows[1]["same_texts_as_sdpa"] == 2 and rows[1]["same_answers_as_sdpa"] == 2
    assert all(r["prompts"] == 2 and r["new_tokens"] > 0 and r["seconds"] > 0 for r in rows)
    assert all(r["rounds"] == 2 and r["spread"] >= 0 for r in rows) and rows[0]["speedup_vs_sdpa"] == 1.0
    # paired round by round: sdpa against itself is 1 in every round; the others lie between their extremes
    assert rows[0]["paired_speedup"] == rows[0]["paired_min"] == rows[0]["paired_max"] == 1.0
    assert all(0 < r["paired_min"] <= r["paired_speedup"] <= r["paired_max"] for r in rows)
    # one batch of 2 prompts, 3 new tokens forced by max_new_tokens unless both rows stop: at most 3 steps
    assert all(1 <= r["steps"] <= 3 and r["ms_per_step"] > 0 for r in rows) and rows[0]["step_speedup_vs_sdpa"] == 1.0
    assert rows[1]["steps"] == rows[0]["steps"]  # p = 1: the same texts, so the same steps
    with open(tmp_path / "eval_workload.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 3 and {"commit", "gpu", "torch", "transformers", "python", "date"} <= set(table[0])
    with open(tmp_path / "eval_workload_samples.jsonl") as handle:
        samples = [json.loads(line) for line in handle]
    assert len(samples) == 6 and {s["impl"] for s in samples} == {"sdpa", "ppa"}


def test_eval_workload_refuses_a_bad_implementation(tmp_path):
    with pytest.raises(ValueError, match="--impls entry 'ppa:tok:1'"):
        eval_workload.main(["--data", DATA, "--out", str(tmp_path), "--impls", "sdpa", "ppa:tok:1"])
