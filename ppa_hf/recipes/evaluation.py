"""Evaluation behind ``ppa-hf eval``: few-shot GSM8K / MATH-500 with batched greedy generation, and strided
perplexity.

    from ppa_hf.recipes.evaluation import run_eval
    summary = run_eval(task="gsm8k", data="../shared/data/gsm8k/test.jsonl", p=0.75, limit=20,
                       output="out/gsm8k.json")

Outputs: ``output`` (JSON summary) and, for generation tasks, ``<output stem>.samples.jsonl`` (one line per
problem: prompt, generation, extracted answer, gold, correct). Both are written to temporary names and renamed
only when the run finishes, so an interrupted or failed run leaves nothing that looks complete.

Under ``accelerate launch`` (``WORLD_SIZE`` > 1) each process loads the model once and runs its share of the
batches (:mod:`~ppa_hf.recipes.sharding`); the results are gathered in problem order, the main process scores
and writes them, and ``run_eval`` returns the same summary on every process.
"""

from __future__ import annotations

import json
import os
import platform
import time

TASKS = ("gsm8k", "math500", "perplexity")
DATA_KINDS = {"gsm8k": "gsm8k", "math500": "math"}


# ---------------------------------------------------------------------------------------------- models


def apply_eval_settings(lm, p=None, window: int | None = None, sink_tokens: int | None = None,
                        backend: str | None = None, granularity: str | None = None, block_size: int | None = None,
                        model_name: str | None = None):
    """Switch ``lm`` to PPA; each argument left ``None`` keeps the value saved in ``lm.config`` (else the default).
    ``p=None`` with no saved ``ppa_p`` is an error (an evaluation never guesses p); ``model_name`` names the model
    in that error."""
    import ppa_hf
    from ..hf.settings import DEFAULTS

    def saved(name, given):
        if given is not None:
            return given
        value = getattr(lm.config, name, None)
        return DEFAULTS[name] if value is None else value

    if p is None and getattr(lm.config, "ppa_p", None) is None:
        name = model_name or getattr(lm.config, "_name_or_path", "") or "SmolLM2 (embedded)"
        raise ValueError(f"--p is not given and the model {name} has no saved ppa_p; "
                         "pass --p in [0, 1] (1 = full attention)")
    ppa_hf.apply(lm, p=saved("ppa_p", p), window=saved("ppa_window", window),
                 sink_tokens=saved("ppa_sink_tokens", sink_tokens), backend=saved("ppa_backend", backend),
                 granularity=saved("ppa_granularity", granularity), block_size=saved("ppa_block_size", block_size))
    return lm


def load_eval_model(model: str | None = None, gguf_file: str | None = None, p=None, window: int | None = None,
                    sink_tokens: int | None = None, dtype: str = "float32", device: str | None = None,
                    backend: str | None = None, granularity: str | None = None, block_size: int | None = None):
    """``(model, tokenizer)`` with PPA on. ``p=None`` keeps the ``ppa_p`` saved in the model's config (an error
    when it has none). ``window``/``sink_tokens``/``backend``/``granularity``/``block_size`` of ``None`` keep the
    saved values (or the defaults)."""
    import torch

    from ..models import load_model

    if model is not None and not os.path.exists(model) and os.path.sep in model:
        raise FileNotFoundError(f"--model={model!r}: no such directory or file")
    lm, tokenizer = load_model(model, gguf_file, dtype=dtype)
    apply_eval_settings(lm, p, window, sink_tokens, backend, granularity, block_size,
                        model_name=model or "SmolLM2 (embedded)")
    from .sharding import process_device

    # under a multi-process launch each process loads its own copy onto its own device (cuda:<local rank>)
    device = device or process_device() or ("cuda" if torch.cuda.is_available() else "cpu")
    lm.to(device).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer


def ppa_summary(config) -> dict:
    """The PPA settings a model ran with, as recorded in every evaluation summary."""
    return {k: getattr(config, k, None)
            for k in ("ppa_p", "ppa_window", "ppa_sink_tokens", "ppa_granularity", "ppa_block_size")}


# ------------------------------------------------------------------------------------------ generation


def build_prompts(task: str, records: list[dict], shots: int, fewshot_records: list[dict] | None) -> list[str]:
    from .data import fewshot_prefix, math_exemplars, prompt_of

    kind = DATA_KINDS[task]
    if shots < 0:
        raise ValueError(f"--shots={shots}; --shots must be an integer >= 0")
    if kind == "gsm8k":
        exemplars = (fewshot_records or [])[:shots]
        if len(exemplars) < shots:
            raise ValueError(f"--shots={shots} but only {len(exemplars)} GSM8K exemplars are available")
    else:
        exemplars = math_exemplars(shots)
    prefix = fewshot_prefix(kind, exemplars)
    return [prefix + prompt_of(r, kind) for r in records]


def gold_of(task: str, record: dict) -> str:
    from .answers import gsm8k_gold, math_gold

    return gsm8k_gold(record["answer"]) if task == "gsm8k" else math_gold(record)


def generate(model, tokenizer, prompts: list[str], batch_size: int = 8, max_new_tokens: int = 256,
             stop_strings=("Question:", "Problem:"), progress: bool = True, desc: str = "generate") -> list[str]:
    """Batched greedy generation with left padding; each text stops at the first stop string.

    Under a multi-process launch each process generates its share of the batches
    (:mod:`~ppa_hf.recipes.sharding`: the single-process batches, so the same generations) and every process
    returns all texts, in prompt order. The progress bar counts prompts; under a launch it is the main process's
    own share."""
    import torch
    from tqdm.auto import tqdm

    from .answers import truncate_at_stop
    from .sharding import gather_in_order, is_main_process, my_batches, num_processes, process_index, run_everywhere

    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    # longest prompts first: less padding per batch; results are put back in order
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    mine = my_batches(order, batch_size)
    if num_processes() > 1:
        desc = f"{desc} (process {process_index()} of {num_processes()})"
    bar = tqdm(total=sum(map(len, mine)), desc=desc, unit="prompt", disable=not (progress and is_main_process()),
               leave=False)

    def run_mine():
        done = []
        for idx in mine:
            batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=tokenizer.pad_token_id, stop_strings=list(stop_strings),
                                     tokenizer=tokenizer)
            new = out[:, batch["input_ids"].shape[1]:]
            for row, i in enumerate(idx):
                text = tokenizer.decode(new[row], skip_special_tokens=True)
                done.append((i, truncate_at_stop(text, stop_strings)))
            bar.update(len(idx))
        bar.close()
        return done

    done = run_everywhere(run_mine)
    return gather_in_order(done, len(prompts))


def evaluate_generation(model, tokenizer, task: str, records: list[dict], shots: int = 4,
                        fewshot_records: list[dict] | None = None, batch_size: int = 8, max_new_tokens: int = 256,
                        strict: bool = False, progress: bool = True) -> tuple[dict, list[dict]]:
    """``(metrics, samples)`` of a generation task on ``records``. Scoring goes through the shipped ``evaluate``
    metric ``ppa_math_accuracy``; per-sample correctness uses the same extraction functions.

    Under a multi-process launch the problems are shared out (:func:`generate`), the main process scores them and
    every process returns its result; ``metrics`` records ``num_processes`` and ``problems_per_process``."""
    from .sharding import from_main, is_main_process, run_everywhere

    prompts = build_prompts(task, records, shots, fewshot_records)
    golds = [gold_of(task, r) for r in records]
    generations = generate(model, tokenizer, prompts, batch_size, max_new_tokens, progress=progress, desc=task)
    # one scorer: the evaluate metric keeps files in a cache folder that concurrent processes would share
    scored = run_everywhere(lambda: score_generations(task, records, prompts, golds, generations, strict)
                            if is_main_process() else None)
    metrics, samples = from_main(scored)
    return {**metrics, **processes_summary(len(records), batch_size, "problems")}, samples


def processes_summary(count: int, batch_size: int, unit: str) -> dict:
    """``num_processes`` and how many of ``count`` items (``unit``: problems, windows) each process ran."""
    from .sharding import items_per_process, num_processes

    return {"num_processes": num_processes(), f"{unit}_per_process": items_per_process(count, batch_size)}


def score_generations(task: str, records: list[dict], prompts: list[str], golds: list[str], generations: list[str],
                      strict: bool) -> tuple[dict, list[dict]]:
    """``(metrics, samples)`` of finished generations (see :func:`evaluate_generation`)."""
    from .answers import extract_gsm8k, extract_math, gsm8k_equal, math_equal
    from .metrics import load_metric

    samples = []
    for prompt, generation, gold, record in zip(prompts, generations, golds, records):
        if task == "gsm8k":
            answer = extract_gsm8k(generation, strict=strict)
            row_strict = extract_gsm8k(generation, strict=True)
            sample = {"answer": answer, "correct": gsm8k_equal(answer, gold),
                      "correct_strict": gsm8k_equal(row_strict, gold), "correct_flexible":
                      gsm8k_equal(extract_gsm8k(generation), gold)}
        else:
            answer = extract_math(generation)
            sample = {"answer": answer, "correct": math_equal(answer, gold)}
        samples.append({"prompt": prompt, "generation": generation, "gold": gold, **sample,
                        **({"unique_id": record["unique_id"]} if "unique_id" in record else {})})
    metrics = {}
    configs = {"gsm8k": ["gsm8k", "gsm8k_strict"], "math500": ["math"]}[task]
    for config in configs:
        result = load_metric(config).compute(predictions=generations, references=golds)
        key = {"gsm8k": "flexible", "gsm8k_strict": "strict", "math": "boxed"}[config]
        metrics[f"accuracy_{key}"] = result["accuracy"]
        metrics[f"extracted_{key}"] = result["extracted"]
    metrics["accuracy"] = metrics["accuracy_strict" if (task == "gsm8k" and strict) else
                                  ("accuracy_flexible" if task == "gsm8k" else "accuracy_boxed")]
    per_sample = sum(s["correct"] for s in samples) / len(samples)
    if abs(per_sample - metrics["accuracy"]) > 1e-9:  # the metric and the per-sample rows must agree
        raise RuntimeError(f"metric accuracy {metrics['accuracy']} != per-sample accuracy {per_sample}")
    metrics["correct"] = sum(s["correct"] for s in samples)
    metrics["total"] = len(samples)
    return metrics, samples


# ----------------------------------------------------------------------------------------------- driver


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def samples_path(output: str) -> str:
    root = output[:-5] if output.endswith(".json") else output
    return root + ".samples.jsonl"


def check_eval_args(task: str, data: str | None, shots: int, limit: int | None, batch_size: int,
                    max_new_tokens: int, p=None):
    """Validate before anything is loaded (errors name the option, the value and what is allowed)."""
    from ..pattern import check_int, check_p

    if task not in TASKS:
        raise ValueError(f"--task={task!r} is not known; --task must be one of {', '.join(TASKS)}")
    if p is not None:
        check_p(p, "--p")
    check_int(shots, "--shots", 0)
    check_int(batch_size, "--batch-size", 1)
    check_int(max_new_tokens, "--max-new-tokens", 1)
    if limit is not None:
        check_int(limit, "--limit", 1)
    if data is not None and task != "perplexity" and not os.path.isfile(data):
        raise FileNotFoundError(f"--data={data!r}: file does not exist (a local JSONL file is expected)")
    if task == "perplexity" and data not in (None, "pydoc", "stdlib") and not os.path.isfile(data):
        raise FileNotFoundError(f"--data={data!r}: file does not exist (a text file, 'pydoc' or 'stdlib')")


def default_data_path(task: str) -> str | None:
    """The offline copy of ``task``'s test set (:func:`~ppa_hf.recipes.data.default_data_dir`), else ``None`` (the
    Hub)."""
    from .data import default_data_dir

    folder = default_data_dir()
    path = os.path.join(folder, {"gsm8k": "gsm8k/test.jsonl", "math500": "math500/test.jsonl"}[task]) if folder else None
    return path if path and os.path.isfile(path) else None


def run_eval(task: str, model: str | None = None, gguf_file: str | None = None, p=None, window=None,
             sink_tokens=None, data: str | None = None, fewshot_data: str | None = None, shots: int = 4,
             limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 256, strict: bool = False,
             output: str | None = None, context: int = 1024, stride: int | None = None,
             max_windows: int | None = None, progress: bool = True, loaded=None, dtype: str = "float32",
             backend: str | None = None, granularity: str | None = None, block_size: int | None = None) -> dict:
    """Evaluate one model on one task; returns the summary dict (also written to ``output`` when given).

    ``loaded=(model, tokenizer)`` reuses a loaded model (its PPA settings are then set from ``p``/... if
    given; what is not given keeps the model's current value). ``backend``/``granularity``/``block_size`` of
    ``None`` keep the saved values (else ``auto``/``token``/128)."""
    import torch

    check_eval_args(task, data, shots, limit, batch_size, max_new_tokens, p)
    started = time.time()
    records = fewshot_records = None
    if task != "perplexity":  # read and check the data before loading the model
        from .data import load_records

        kind = DATA_KINDS[task]
        data = data or default_data_path(task)
        records, _ = load_records(data, kind, split="test", limit=limit, name="--data")
        if kind == "gsm8k" and shots > 0:
            train = fewshot_data or (os.path.join(os.path.dirname(data), "train.jsonl") if data else None)
            if train is not None and not os.path.isfile(train):
                raise FileNotFoundError(f"--fewshot-data={train!r}: file does not exist (GSM8K exemplars come from "
                                        "the train split; pass --fewshot-data or --shots 0)")
            fewshot_records, _ = load_records(train, "gsm8k", split="train", limit=shots, name="--fewshot-data")
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
    if loaded is None:
        lm, tokenizer = load_eval_model(model, gguf_file, p, window, sink_tokens, dtype=dtype, backend=backend,
                                        granularity=granularity, block_size=block_size)
    else:
        lm, tokenizer = loaded
        if any(v is not None for v in (p, window, sink_tokens, backend, granularity, block_size)):
            apply_eval_settings(lm, p, window, sink_tokens, backend, granularity, block_size)
    summary = {"task": task, "model": model or "SmolLM2-135M-Instruct (embedded GGUF)", **ppa_summary(lm.config)}
    if task == "perplexity":
        from .perplexity import load_text, perplexity

        text = load_text(data)
        result = perplexity(lm, tokenizer, text, context=context, stride=stride, max_windows=max_windows,
                            progress=progress)
        summary.update({"data": data or "pydoc", **result})
        samples = None
    else:
        metrics, samples = evaluate_generation(lm, tokenizer, task, records, shots, fewshot_records, batch_size,
                                               max_new_tokens, strict, progress)
        summary.update({"data": data or "hub", "shots": shots, "limit": limit, "max_new_tokens": max_new_tokens,
                        "strict": strict, **metrics})
    summary.update({"seconds": round(time.time() - started, 1), "machine": platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    if output:
        from .sharding import is_main_process, run_everywhere

        spath = samples_path(output) if samples is not None else None
        if spath:
            summary["samples_file"] = spath

        def write():  # every process holds the gathered result; one writes it
            if not is_main_process():
                return
            if spath:
                from .data import write_jsonl

                write_jsonl(spath + ".partial", samples)
                os.replace(spath + ".partial", spath)
            _atomic_write_text(output, json.dumps(summary, indent=2) + "\n")  # the summary last: marks completion

        run_everywhere(write)  # the files exist on every process's return (or every process raises)
    return summary
