"""The evaluation workload, timed: GSM8K few-shot prompts, left-padded in one batch, greedy ``generate`` with the
embedded SmolLM2-135M-Instruct, sdpa against PPA in one process; and whether PPA at p = 1 gives sdpa's answers.

    python benchmarks/eval_workload.py --data ../shared/data/gsm8k/test.jsonl --out OUT [--limit 50]
        [--batch-size 50] [--max-new-tokens 256] [--dtype float32] [--rounds 3]
        [--impls sdpa ppa:token:1 ppa:token:0.75 ...]

Each implementation first runs the batches once untimed (one-off costs: kernel compilation, cuDNN plans); then, in
each of ``--rounds`` rounds, every implementation runs them once in turn, timed (the host's speed drifts over
seconds: taking turns spreads the drift over all of them; each round starts with the next implementation, so that
none always runs first, and garbage is collected before each run). Writes, after each round, ``eval_workload.csv``
(a row per implementation: median seconds, the spread of its rounds, new tokens, tokens per second, speedup against
sdpa of the medians and paired round by round (median, min, max), the decoding steps its batches ran and the time
per step against sdpa's (where texts differ, the batches run different numbers of steps, and only the per-step
figure compares like with like), accuracy, how many answers and texts equal sdpa's; machine stamp) and
``eval_workload_samples.jsonl`` (every prompt's generation and extracted answer per implementation, from its first
timed run) to OUT.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.run import sdpa_backends, use_impl  # noqa: E402
from ppa_hf.recipes.answers import extract_gsm8k, gsm8k_equal, truncate_at_stop  # noqa: E402
from ppa_hf.recipes.evaluation import build_prompts, gold_of  # noqa: E402
from ppa_hf.recipes.stamp import machine_stamp  # noqa: E402

STOP = ("Question:", "Problem:")


def load_jsonl(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def parse_impl(spec: str) -> tuple[str, str | None, float | None]:
    """``sdpa`` | ``sdpa_flash`` | ``ppa:GRANULARITY:P`` -> ``(impl, granularity, p)``."""
    if spec in ("sdpa", "sdpa_flash"):
        return spec, None, None
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "ppa" or parts[1] not in ("token", "block"):
        raise ValueError(f"--impls entry {spec!r} must be sdpa, sdpa_flash or ppa:token|block:P")
    return "ppa", parts[1], float(parts[2])


def run_batches(model, tokenizer, prompts, batch_size: int, max_new_tokens: int):
    """``(texts, new_tokens, steps, seconds)``: greedy generation of every prompt (batches in prompt order,
    left-padded, stop strings as in ``ppa-hf eval``); ``steps``: the decoding steps the batches ran (a batch runs until
    its last row stops, so two implementations whose texts differ can run different numbers of steps)."""
    device = next(model.parameters()).device
    texts, new_tokens, steps = [], 0, 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for lo in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[lo:lo + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, stop_strings=list(STOP), tokenizer=tokenizer)
        new = out[:, batch["input_ids"].shape[1]:]
        new_tokens += int((new != tokenizer.pad_token_id).sum())
        steps += new.shape[1]
        texts += [truncate_at_stop(tokenizer.decode(row, skip_special_tokens=True), STOP) for row in new]
    sync()
    return texts, new_tokens, steps, time.perf_counter() - t0


def _row(stamp, v, first, times, base, golds, lengths, args, rounds: int) -> dict:
    """The CSV row of implementation ``v`` after ``rounds`` rounds: the median of its timed runs, their spread
    ((max - min) / median), the speedup against sdpa (``base``) of the medians and, paired, round by round (each
    round's sdpa time over this implementation's in the same round: drift slower than a round cancels), and its
    first run's texts and answers against sdpa's."""
    impl, granularity, p = v
    texts, answers, new_tokens, steps = first[v]
    seconds = statistics.median(times[v])
    base_seconds, base_steps = statistics.median(times[base]), first[base][3]
    paired = [b / t for b, t in zip(times[base], times[v])]
    return {k: stamp[k] for k in ("gpu", "torch", "transformers", "python", "commit", "date")} | dict(
        impl=impl, granularity=granularity or "dense", p=p if p is not None else 1.0, dtype=args.dtype,
        prompts=len(golds), prompt_tokens_min=min(lengths), prompt_tokens_max=max(lengths),
        batch=args.batch_size, max_new_tokens=args.max_new_tokens, seconds=round(seconds, 3),
        rounds=rounds, spread=round((max(times[v]) - min(times[v])) / seconds, 3),
        new_tokens=new_tokens, tokens_per_s=round(new_tokens / seconds, 1),
        speedup_vs_sdpa=round(base_seconds / seconds, 3), paired_speedup=round(statistics.median(paired), 3),
        paired_min=round(min(paired), 3), paired_max=round(max(paired), 3),
        steps=steps, ms_per_step=round(seconds / steps * 1e3, 3),
        step_speedup_vs_sdpa=round((base_seconds / base_steps) / (seconds / steps), 3),
        accuracy=sum(gsm8k_equal(a, g) for a, g in zip(answers, golds)) / len(golds),
        same_answers_as_sdpa=sum(a == b for a, b in zip(answers, first[base][1])),
        same_texts_as_sdpa=sum(a == b for a, b in zip(texts, first[base][0])))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="GSM8K test JSONL (train.jsonl beside it gives the exemplars)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds; in each, every implementation runs once")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impls", nargs="+", default=["sdpa", "sdpa_flash", "ppa:token:1", "ppa:token:0.75",
                                                   "ppa:block:0.75"])
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise ValueError(f"--rounds {args.rounds}: at least one timed round is needed")
    impls = [parse_impl(s) for s in args.impls]
    if impls[0][0] != "sdpa":
        raise ValueError("--impls must start with sdpa: the other rows are compared with it")

    from ppa_hf.models import load_model

    records = load_jsonl(args.data)[: args.limit]
    exemplars = load_jsonl(os.path.join(os.path.dirname(args.data), "train.jsonl"))
    prompts = build_prompts("gsm8k", records, args.shots, exemplars)
    golds = [gold_of("gsm8k", r) for r in records]
    model, tokenizer = load_model(dtype=args.dtype)
    model.to(args.device).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    stamp = machine_stamp()
    os.makedirs(args.out, exist_ok=True)
    for impl, granularity, p in impls:  # one-off costs first (kernel compilation, cuDNN plans), untimed
        use_impl(model, impl, granularity, p)
        with sdpa_backends(impl):
            run_batches(model, tokenizer, prompts, args.batch_size, args.max_new_tokens)
    times = {v: [] for v in impls}
    first: dict = {}
    for rnd in range(args.rounds):  # the implementations take turns: the host's speed drifts over seconds
        for v in impls[rnd % len(impls):] + impls[:rnd % len(impls)]:  # each round starts one further along
            impl, granularity, p = v
            use_impl(model, impl, granularity, p)
            gc.collect()  # the previous run's garbage is not collected inside this one's timing
            with sdpa_backends(impl):
                texts, new_tokens, steps, seconds = run_batches(model, tokenizer, prompts, args.batch_size,
                                                                args.max_new_tokens)
            times[v].append(seconds)
            if v not in first:
                first[v] = (texts, [extract_gsm8k(t) for t in texts], new_tokens, steps)
                with open(os.path.join(args.out, "eval_workload_samples.jsonl"), "a") as handle:
                    for i, (text, answer) in enumerate(zip(texts, first[v][1])):
                        handle.write(json.dumps(dict(impl=impl, granularity=granularity, p=p, index=i,
                                                     gold=golds[i], answer=answer, generation=text)) + "\n")
        rows = [_row(stamp, v, first, times, impls[0], golds, lengths, args, rnd + 1) for v in impls]
        for row in rows:
            print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "eval_workload.csv"), "w", newline="") as handle:  # a cut run keeps its rows
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
