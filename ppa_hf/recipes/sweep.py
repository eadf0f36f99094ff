"""``ppa-hf sweep``: one model, one budget, a list of p: evaluation (optionally after a short fine-tune at each
p), a CSV and the S-curve plot of the metric against p.

Layout of ``--out-dir``::

    points/p=<p>.json          one finished point (the eval summary); written atomically, so it exists only
                               for completed points. A rerun with the same arguments skips these (resume).
    points/p=<p>.samples.jsonl per-problem rows of that point (generation tasks)
    finetune/p=<p>/            the fine-tuned model of that point (with --finetune-steps > 0; resumable)
    sweep.csv, sweep.png       written when every point is done (temporary name, then renamed)
"""

from __future__ import annotations

import csv
import json
import os
import time

CSV_NAME, PNG_NAME = "sweep.csv", "sweep.png"
SETTINGS_NAME = "sweep_settings.json"
# what must not change between an interrupted run and its resume
_BUDGET_KEYS = ("task", "model", "gguf_file", "window", "sink_tokens", "data", "shots", "limit", "max_new_tokens",
                "strict", "context", "stride", "max_windows", "finetune_steps", "train_file", "seq_len", "lr",
                "lora_r", "train_batch_size", "seed", "dtype", "granularity", "block_size")


def _point_name(p: float) -> str:
    return f"p={p:g}"


def metric_of(task: str) -> tuple[str, str]:
    return ("ppl", "perplexity") if task == "perplexity" else ("accuracy", "accuracy")


def _check_settings(out_dir: str, args) -> None:
    """The budget of a sweep is fixed: resuming with different settings is refused (one clear line)."""
    from .sharding import is_main_process, wait_for_everyone

    path = os.path.join(out_dir, SETTINGS_NAME)
    current = {k: getattr(args, k, None) for k in _BUDGET_KEYS}
    existed = os.path.isfile(path)
    if existed:
        with open(path) as handle:
            saved = json.load(handle)
        changed = [k for k in _BUDGET_KEYS if saved.get(k) != current[k]]
        if changed:
            k = changed[0]
            raise ValueError(f"--out-dir={out_dir!r} holds a sweep with {k}={saved.get(k)!r}, but this run has "
                             f"{k}={current[k]!r}; use a new --out-dir or the same settings to resume")
    wait_for_everyone()  # under a launch: every process has read the folder before the main one writes to it
    if not existed and is_main_process():
        with open(path, "w") as handle:
            json.dump(current, handle, indent=2)


def finetune_point(args, p: float, out_dir: str, ppa: dict) -> str:
    """Short fine-tune at ``p`` with the sweep's whole PPA setting ``ppa`` (window, sinks, backend, granularity,
    block size; ``None`` = the fine-tune's default), so the model is trained at the pattern it is evaluated at.
    Resumes its own checkpoint; returns the model folder."""
    from .options import option_name
    from .training import build_parser, checkpoint_dirs, train

    folder = os.path.join(out_dir, "finetune", _point_name(p))
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    argv = ["--p", repr(p), "--output-dir", folder, "--max-steps", str(args.finetune_steps),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.train_batch_size), "--lr", str(args.lr),
            "--lora-r", str(args.lora_r), "--seed", str(args.seed), "--save-every", "0", "--no-progress"]
    for name, value in ppa.items():
        if name != "p" and value is not None:
            argv += [option_name(name), str(value)]
    if args.model is not None:
        argv += ["--model", args.model]
    if args.gguf_file is not None:
        argv += ["--gguf-file", args.gguf_file]
    if args.train_file is not None:
        argv += ["--train-file", args.train_file]
    if checkpoint_dirs(folder):
        argv += ["--resume-from", "latest"]
    train(build_parser().parse_args(argv), end_process_group=False)  # the evaluation after it gathers over the group
    return folder


def run_sweep(args) -> dict:
    from .evaluation import check_eval_args, load_eval_model, run_eval
    from ..pattern import check_int, check_p
    from .options import ppa_settings
    from .sharding import is_main_process, num_processes, wait_for_everyone

    ps = [check_p(p, "--ps") for p in args.ps]
    ppa = ppa_settings(args)  # window, sinks, backend, granularity, block size (None: saved / default)
    if len(set(ps)) != len(ps):
        raise ValueError(f"--ps={args.ps} repeats a value; each p once")
    check_eval_args(args.task, args.data, args.shots, args.limit, args.batch_size, args.max_new_tokens)
    check_int(args.finetune_steps, "--finetune-steps", 0)
    if args.train_file is not None and not os.path.isfile(args.train_file):
        raise FileNotFoundError(f"--train-file={args.train_file!r}: file does not exist (a local JSONL file)")
    if args.task == "perplexity" and args.data not in (None, "pydoc", "stdlib") and not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data={args.data!r}: file does not exist (a text file, 'pydoc' or 'stdlib')")
    out_dir = args.out_dir
    points_dir = os.path.join(out_dir, "points")
    os.makedirs(points_dir, exist_ok=True)
    # decided before anything is written, so that every process of a launch skips the same points
    done_before = {p: os.path.isfile(os.path.join(points_dir, _point_name(p) + ".json")) for p in ps}
    _check_settings(out_dir, args)
    key, label = metric_of(args.task)
    say = print if is_main_process() else (lambda *a, **k: None)
    loaded = None
    rows = []
    for p in ps:
        point_json = os.path.join(points_dir, _point_name(p) + ".json")
        if done_before[p]:
            with open(point_json) as handle:
                summary = json.load(handle)
            say(f"p={p:g}: done before ({key}={summary[key]}), skipped", flush=True)
        else:
            started = time.time()
            common = dict(task=args.task, data=args.data, fewshot_data=args.fewshot_data, shots=args.shots,
                          limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          strict=args.strict, output=point_json, context=args.context, stride=args.stride,
                          max_windows=args.max_windows, progress=True)
            if args.finetune_steps > 0:
                model_dir = finetune_point(args, p, out_dir, ppa)
                summary = run_eval(model=model_dir, p=None, dtype=args.dtype, **ppa, **common)
            else:
                if loaded is None:  # one load for every point: apply() switches p in place
                    loaded = load_eval_model(args.model, args.gguf_file, p, dtype=args.dtype, **ppa)
                summary = run_eval(model=args.model, gguf_file=args.gguf_file, p=p, loaded=loaded, **ppa, **common)
            say(f"p={p:g}: {key}={summary[key]:.4f} ({time.time() - started:.0f} s)", flush=True)
        rows.append({"p": p, key: summary[key], **({"correct": summary["correct"], "total": summary["total"]}
                                                   if key == "accuracy" else {"nll": summary["nll"],
                                                                               "tokens": summary["tokens"]}),
                     "window": summary.get("ppa_window"), "sink_tokens": summary.get("ppa_sink_tokens"),
                     "task": args.task, "finetune_steps": args.finetune_steps, "seconds": summary.get("seconds")})

    csv_path, png_path = os.path.join(out_dir, CSV_NAME), os.path.join(out_dir, PNG_NAME)
    if is_main_process():
        write_csv_and_plot(args, rows, csv_path, png_path, key, label)
    wait_for_everyone()
    return {"csv": csv_path, "png": png_path, "rows": rows}


def write_csv_and_plot(args, rows: list[dict], csv_path: str, png_path: str, key: str, label: str) -> None:
    from .plots import plot_metric_vs_p

    with open(csv_path + ".partial", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["p"]))
    model_name = os.path.basename(str(args.model).rstrip("/")) if args.model else "SmolLM2-135M-Instruct"
    budget = f"fine-tuned {args.finetune_steps} steps" if args.finetune_steps else "zero-shot PPA"
    plot_metric_vs_p(png_path + ".partial.png", {(label if args.task == "perplexity" else f"{args.task} {label}"): [(r["p"], r[key]) for r in rows]},
                     label, f"{model_name}, {budget}, {args.task}" +
                     (f", {args.limit} problems" if args.limit and args.task != "perplexity" else ""),
                     logy=key == "ppl")
    os.replace(png_path + ".partial.png", png_path)
    os.replace(csv_path + ".partial", csv_path)  # the CSV last: marks a complete sweep
