"""The rerun of docs/results.md section 6 (ppa_hf.recipes.scurve_runs + retrieval), at toy scale on CPU: the tasks
are deterministic per seed, the flatness and plateau rules, and the whole pipeline (tiny random-init Llama with the
SmolLM2 tokenizer, 2 p values + 1 block point, 1 seed, a handful of prompts, 2 steps) writes the CSV with every
required column, the per-prompt and learning-curve files, the summary with intervals and paired tests, and skips
finished runs when run again (a cut run continues)."""

import csv
import json
import random

import pytest
import torch

from ppa_hf.recipes import scurve_runs
from ppa_hf.recipes.retrieval import MultiKey, Passkey, eval_set, keys_at_query, train_rng
from ppa_hf.recipes.stats import wilson_interval


class CharTokenizer:
    """One token per character (ids = code points): lengths and positions are easy to check."""

    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=False):
        return self._Out([ord(c) for c in text])

    def decode(self, ids):
        return "".join(map(chr, ids))


FILLER = torch.tensor([ord(c) for c in ("lorem ipsum dolor sit amet " * 400)])


@pytest.mark.parametrize("cls", [Passkey, MultiKey])
def test_tasks_deterministic_and_well_formed(cls):
    tok = CharTokenizer()
    task = cls(tok, FILLER, 600)
    a, b = eval_set(task, 5, seed=3), eval_set(task, 5, seed=3)
    assert a == b  # deterministic per seed
    assert [s["answer_text"] for s in eval_set(task, 5, seed=4)] != [s["answer_text"] for s in a]
    rng = train_rng(3)
    assert [s["answer_text"] for s in a] != [task.sample(rng)["answer_text"] for _ in range(5)]  # train != eval
    for s in a:
        assert len(s["prompt"]) + len(s["answer"]) == 600
        assert tok.decode(s["answer"]) == " " + s["answer_text"] and 0.0 <= s["depth"] <= 1.0
        text = tok.decode(s["prompt"])
        if cls is Passkey:
            assert f"The pass key is {s['answer_text']}." in text
        else:
            pairs = s["pairs"]
            assert len(pairs) == 8 and len(set(pairs.values())) == 8 and pairs[s["asked"]] == int(s["answer_text"])
            for name, value in pairs.items():  # every pair stated once, the asked name asked at the end
                assert text.count(f"The special magic number for {name} is {value}.") == 1
            assert text.endswith(f"The special magic number for {s['asked']} is")
    ids, labels = task.batch(random.Random(0), 3)
    assert ids.shape == labels.shape == (3, 600)
    assert ((labels != -100).sum(1) == 6).all()  # loss on the 6 answer characters only
    assert (labels[labels != -100] == ids[labels != -100]).all()


def test_task_refuses_a_context_longer_than_its_filler():
    with pytest.raises(ValueError, match="filler"):
        Passkey(CharTokenizer(), FILLER[:100], 600).sample(random.Random(0))


def test_keys_at_query_matches_the_closed_form():
    from ppa_hf.pattern import attended_keys

    for p in (0.0, 0.5, 0.75, 1.0):
        assert keys_at_query(2041, p) == attended_keys(2041, p, 64, 0)
    assert keys_at_query(2041, 0.5, granularity="block") == 122  # docs/results.md section 3


def test_flatness():
    assert scurve_runs.flatness([2.0] * 100)["flat"]
    falling = [2.0 - 0.01 * i for i in range(100)]
    assert not scurve_runs.flatness(falling)["flat"]
    curve = [3.0 - 0.05 * i for i in range(40)] + [1.0] * 60
    result = scurve_runs.flatness(curve)
    assert result["flat"] and result["loss_last"] == pytest.approx(1.0) and 40 <= result["flat_step"] <= 50


def test_plateau_statement():
    rising = {0.0: (2, 500), 0.5: (40, 500), 0.875: (300, 500), 1.0: (495, 500)}
    assert scurve_runs.plateau_statement(rising).startswith("No plateau below p = 1")
    plateau = {0.0: (2, 500), 0.5: (40, 500), 0.75: (490, 500), 0.875: (494, 500), 1.0: (495, 500)}
    assert scurve_runs.plateau_statement(plateau).startswith("Plateau below p = 1 from p = 0.75")
    flat = {0.0: (0, 6), 1.0: (0, 6)}
    assert "no rise to describe" in scurve_runs.plateau_statement(flat)
    # overlapping 95% intervals but a significant difference (Fisher p = 0.03): not a plateau
    close = {0.5: (15, 200), 0.875: (194, 200), 1.0: (200, 200)}
    statement = scurve_runs.plateau_statement(close)
    assert statement.startswith("No plateau below p = 1") and "Fisher's exact test tells them apart" in statement
    assert "not measured" in scurve_runs.plateau_statement({0.5: (1, 5)})


REQUIRED = ["task", "granularity", "p", "seed", "context", "n_eval", "acc", "acc_ci_low", "acc_ci_high",
            "acc_before", "final_loss", "ppl_before", "ppl_after", "keys_at_answer", "flat", "gpu", "torch",
            "transformers", "python", "commit", "date"]


def test_pipeline_toy_scale(tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    argv = ["run", "--out-dir", str(out), "--model-config", "tiny", "--tasks", "passkey:96", "--token-ps", "0.5",
            "1", "--block-ps", "0.5", "--seeds", "0", "--n-eval", "4", "--steps", "2", "--batch-size", "2",
            "--window", "16", "--block-size", "16", "--ppl-windows", "1", "--filler-chars", "20000",
            "--heldout-chars", "4000", "--workers-per-gpu", "1", "--cpu", "--backend", "naive"]
    built = []
    real_worker = scurve_runs.Worker

    def one_worker(args, device):  # the same real Worker for both calls below (one tokenizer load)
        if not built:
            built.append(real_worker(args, device))
        built[0].args = args
        return built[0]

    monkeypatch.setattr(scurve_runs, "Worker", one_worker)
    assert scurve_runs.main(argv) == 0
    rows = list(csv.DictReader(open(out / "scurve_runs.csv")))
    assert len(rows) == 3 and not set(REQUIRED) - set(rows[0])
    assert {(r["granularity"], float(r["p"])) for r in rows} == {("token", 0.5), ("token", 1.0), ("block", 0.5)}
    for r in rows:
        n, k = int(r["n_eval"]), int(r["n_correct"])
        assert n == 4 and float(r["acc"]) == k / n
        lo, hi = wilson_interval(k, n)
        assert (float(r["acc_ci_low"]), float(r["acc_ci_high"])) == (round(lo, 4), round(hi, 4))
        assert float(r["ppl_before"]) > 1 and float(r["ppl_after"]) > 1 and r["python"] and r["commit"]
        name = scurve_runs.Job(r["task"], int(r["context"]), r["granularity"], float(r["p"]), int(r["seed"])).name
        prompts = [json.loads(line) for line in open(out / "prompts" / f"{name}.jsonl")]
        assert len(prompts) == 4 and sum(p["ok_after"] for p in prompts) == k
        assert [json.loads(line)["step"] for line in open(out / "curves" / f"{name}.jsonl")] == [1, 2]
    full = next(r for r in rows if float(r["p"]) == 1.0)
    assert int(full["keys_at_answer"]) == int(full["answer_query"]) + 1  # full attention: every earlier key
    summary = (out / "summary.md").read_text()
    assert "Token pattern:" in summary and "Block vs token, paired by prompt" in summary
    k = int(full["n_correct"])
    lo, hi = wilson_interval(k, 4)
    assert f"| token | 1 | 0 | {k / 4:.3f} | {k / 4:.3f} [{lo:.3f}, {hi:.3f}] |" in summary
    assert (out / "scurve_passkey_96.png").stat().st_size > 0 and (out / "paired_tests.csv").exists()
    # a cut run: drop one finished row; the same command redoes that run only
    kept = rows[:1] + rows[2:]
    with open(out / "scurve_runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    capsys.readouterr()
    assert scurve_runs.main(argv) == 0
    assert "1 runs to do (2 already" in capsys.readouterr().out
    again = list(csv.DictReader(open(out / "scurve_runs.csv")))
    assert len(again) == 3 and again[-1]["p"] == rows[1]["p"] and again[-1]["granularity"] == rows[1]["granularity"]
    assert scurve_runs.main(argv) == 0
    assert "0 runs to do (3 already" in capsys.readouterr().out
    assert len(built) == 1


def test_worker_processes_share_one_queue(tmp_path):
    """Two worker processes (spawned, CPU) pull the grid from one queue; every run lands once in the CSV."""
    out = tmp_path / "runs"
    argv = ["run", "--out-dir", str(out), "--model-config", "tiny", "--tasks", "passkey:64", "--token-ps", "0",
            "1", "--block-ps", "--seeds", "1", "--n-eval", "2", "--steps", "1", "--batch-size", "1",
            "--window", "8", "--block-size", "8", "--ppl-windows", "1", "--filler-chars", "6000",
            "--heldout-chars", "2000", "--workers-per-gpu", "2", "--cpu", "--backend", "naive"]
    assert scurve_runs.main(argv) == 0
    rows = list(csv.DictReader(open(out / "scurve_runs.csv")))
    assert sorted(float(r["p"]) for r in rows) == [0.0, 1.0]
    assert not (out / "errors.jsonl").exists()


def test_cut_fine_tune_resumes_where_it_stopped(tmp_path, monkeypatch):
    """A run cut right after its step-2 checkpoint resumes there and ends exactly as an uncut run does."""
    common = ["--model-config", "tiny", "--tasks", "passkey:64", "--token-ps", "0.5", "--block-ps", "--seeds", "0",
              "--n-eval", "3", "--steps", "4", "--batch-size", "2", "--window", "8", "--block-size", "8",
              "--ppl-windows", "1", "--filler-chars", "6000", "--heldout-chars", "2000", "--workers-per-gpu", "1",
              "--cpu", "--backend", "naive", "--checkpoint-every", "2"]
    parser = scurve_runs.build_parser()
    cut_args = scurve_runs.resolve(parser.parse_args(["run", "--out-dir", str(tmp_path / "cut")] + common))
    ref_args = scurve_runs.resolve(parser.parse_args(["run", "--out-dir", str(tmp_path / "ref")] + common))
    job = scurve_runs.plan(cut_args)[0]
    worker = scurve_runs.Worker(cut_args, torch.device("cpu"))
    real_finetune = scurve_runs.finetune

    def cut_after_first_save(*a, save=None, **k):
        def save_then_die(state):
            save(state)
            raise RuntimeError("cut")
        return real_finetune(*a, save=save_then_die, **k)

    monkeypatch.setattr(scurve_runs, "finetune", cut_after_first_save)
    with pytest.raises(RuntimeError, match="cut"):
        worker.run(job)
    assert (tmp_path / "cut" / "checkpoints" / f"{job.name}.pt").exists()
    monkeypatch.setattr(scurve_runs, "finetune", real_finetune)
    resumed = worker.run(job)
    worker.args = ref_args
    reference = worker.run(job)
    assert resumed["resumed_at_step"] == 2 and reference["resumed_at_step"] == 0
    for field in ("final_loss", "acc", "acc_before", "ppl_before", "ppl_after", "mean_logp_after"):
        assert resumed[field] == reference[field], field
    curve = lambda d: [json.loads(line)["loss"] for line in open(tmp_path / d / "curves" / f"{job.name}.jsonl")]  # noqa: E731
    assert curve("cut") == curve("ref") and len(curve("ref")) == 4
