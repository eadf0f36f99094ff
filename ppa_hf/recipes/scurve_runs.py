"""The fine-tuned retrieval curve against ``p``, run so that it can carry a claim (docs/results.md section 6).

    python -m ppa_hf.recipes.scurve_runs run --out-dir DIR [--smoke] [--tasks passkey:2048 multikey:4096 ...]
        [--token-ps ...] [--block-ps ...] [--seeds 0 1 2] [--n-eval 500] [--steps 600] [--workers-per-gpu 4]
    python -m ppa_hf.recipes.scurve_runs summary --out-dir DIR

One run = (task, context, granularity, p, seed): SmolLM2-135M-Instruct (or ``--model-config tiny``, a random-init
Llama for tests) patched to PPA; retrieval accuracy on ``--n-eval`` prompts of the seed and held-out perplexity
before; ``--steps`` fine-tuning steps (the same budget for every run; the seed fixes the data order); the same two
measurements after. The seed also fixes the evaluation prompts (a different set per seed, the same for every
pattern at one seed, so block and token are paired prompt by prompt).

Written to DIR as it goes:

* ``scurve_runs.csv``: a row per finished run (appended under a file lock; a run already there is skipped, so the
  same command continues a cut run);
* ``curves/RUN.jsonl``: the loss of every training step; ``prompts/RUN.jsonl``: every evaluation prompt's answer,
  depth, greedy prediction, exact match and answer log-likelihood, before and after the fine-tune;
* ``errors.jsonl``: a run that raised (with its traceback), so one failure does not stop the grid;
* ``summary.md``, ``paired_tests.csv``, ``scurve_TASK_CTX.png``, ``curves_TASK_CTX.png`` (:func:`summarize`,
  from the CSV and the per-prompt files only).

Scoring: exact match of the greedy answer, teacher-forced in one forward pass: every answer token must be the
argmax given the prompt and the answer's earlier tokens, which is exactly when greedy decoding reproduces the
answer. Flatness of a run's loss curve: the mean loss of the last ``--flat-frac`` of the steps is within
``max(--flat-abs, --flat-rel * previous)`` of the mean of the same number of steps before them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass

TOKEN_PS = [0.0, 0.25, 0.5, 0.625, 0.75, 0.8125, 0.875, 0.9375, 1.0]
BLOCK_PS = [0.5, 0.625, 0.75, 0.875]
TASKS = ["passkey:2048", "multikey:4096", "multikey:8192"]
SMOKE = dict(tasks=["passkey:2048", "multikey:4096"], token_ps=[0.5, 0.875, 1.0], block_ps=[0.875], seeds=[0],
             n_eval=200, steps=150)
CSV_NAME = "scurve_runs.csv"
KEY_FIELDS = ("task", "context", "granularity", "p", "seed", "steps", "n_eval")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class Job:
    task: str
    context: int
    granularity: str
    p: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}_ctx{self.context}_{self.granularity}_p{self.p:g}_s{self.seed}"


# ------------------------------------------------------------------------------------------------------- the grid
def parse_tasks(specs) -> list[tuple[str, int]]:
    from .retrieval import TASKS as KNOWN

    out = []
    for spec in specs:
        name, _, ctx = spec.partition(":")
        if name not in KNOWN or not ctx.isdigit() or int(ctx) < 16:
            raise ValueError(f"--tasks entry {spec!r} must be TASK:CONTEXT with TASK in {', '.join(KNOWN)} and "
                             "CONTEXT an integer >= 16")
        out.append((name, int(ctx)))
    return out


def plan(args) -> list[Job]:
    """Every run of the grid, seed-major (a cut grid has whole curves of the first seeds), longest contexts first
    within a seed (fewer stragglers at the end)."""
    jobs = []
    for seed in args.seeds:
        for task, ctx in sorted(parse_tasks(args.tasks), key=lambda t: -t[1]):
            for gran, ps in (("token", args.token_ps), ("block", args.block_ps)):
                jobs += [Job(task, ctx, gran, float(p), int(seed)) for p in ps]
    return jobs


def _key(row: dict) -> tuple:
    return (row["task"], int(row["context"]), row["granularity"], float(row["p"]), int(row["seed"]),
            int(row["steps"]), int(row["n_eval"]))


def read_rows(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, CSV_NAME)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return list(csv.DictReader(handle))


def done_keys(out_dir: str) -> set:
    return {_key(r) for r in read_rows(out_dir)}


def job_key(job: Job, args) -> tuple:
    return (job.task, job.context, job.granularity, job.p, job.seed, args.steps, args.n_eval)


def append_row(out_dir: str, row: dict) -> None:
    """Append ``row`` to the CSV under an exclusive lock (several workers write); the header is the union of the
    rows' fields; written to a temporary file and renamed, so a cut never leaves half a CSV."""
    import fcntl

    path = os.path.join(out_dir, CSV_NAME)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = read_rows(out_dir) + [row]
        fields = list(dict.fromkeys(k for r in rows for k in r))
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------------ one run's parts
def flatness(losses, frac: float = 0.1, abs_tol: float = 0.02, rel_tol: float = 0.05) -> dict:
    """Whether a loss curve has flattened: ``last`` = mean of the final ``w = max(1, frac * n)`` steps, ``prev``
    = mean of the ``w`` before; flat iff ``|prev - last| <= max(abs_tol, rel_tol * prev)``. ``flat_step``: the
    first step from which the moving mean (window ``w``) stays within that tolerance of ``last``."""
    n = len(losses)
    w = max(1, int(n * frac))
    if n < 2 * w or n < 2:
        return {"flat": False, "loss_last": float("nan"), "loss_prev": float("nan"), "flat_step": n}
    last = sum(losses[-w:]) / w
    prev = sum(losses[-2 * w : -w]) / w
    tol = max(abs_tol, rel_tol * abs(prev))
    flat = abs(prev - last) <= tol
    flat_step = n
    running = sum(losses[:w])
    means = [running / w]
    for i in range(w, n):
        running += losses[i] - losses[i - w]
        means.append(running / w)  # means[k]: steps k+1 .. k+w (1-based), ends at step k + w
    for k in range(len(means) - 1, -1, -1):
        if abs(means[k] - last) > tol:
            break
        flat_step = k + w
    return {"flat": bool(flat), "loss_last": last, "loss_prev": prev, "flat_step": int(flat_step)}


def _answer_window(samples) -> int:
    return max(len(s["answer"]) for s in samples) + 1


def score(model, samples, batch_size: int, autocast) -> list[dict]:
    """Greedy exact match and answer log-likelihood of every sample, teacher-forced (see the module docstring)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for first in range(0, len(samples), batch_size):
            chunk = samples[first : first + batch_size]
            ids = torch.tensor([s["prompt"] + s["answer"] for s in chunk], device=device)
            keep = _answer_window(chunk)
            with autocast():
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits.float()  # [B, keep, V]
            logp = torch.log_softmax(logits, dim=-1)
            for row, s in enumerate(chunk):
                a = len(s["answer"])
                # logits at positions context-1-a .. context-2 predict the answer tokens
                sl = slice(keep - 1 - a, keep - 1)
                target = torch.tensor(s["answer"], device=device)
                pred = logits[row, sl].argmax(-1)
                out.append({"ok": bool(torch.equal(pred, target)), "pred": pred.tolist(),
                            "logp": round(float(logp[row, sl].gather(-1, target[:, None]).sum()), 4)})
    return out


def finetune(model, task, seed: int, steps: int, batch_size: int, micro_batch: int, lr: float, warmup: int,
             autocast, max_grad_norm: float = 1.0, resume: dict | None = None, checkpoint_every: int = 0,
             save=None) -> list[dict]:
    """``steps`` AdamW steps on ``task`` batches of the seed's training stream (loss on the answer tokens only:
    the mean over every answer token of the batch, accumulated over micro-batches); lr warm-up over ``warmup``
    steps, then constant (so a flat curve is the model's, not a decayed learning rate's). Returns the curve.

    Every ``checkpoint_every`` steps (0: never) ``save(state)`` gets the model, optimizer, scheduler, data-stream
    and curve state; ``resume`` (such a state) continues from it exactly where it stopped."""
    import torch

    from .retrieval import train_rng

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    rng = train_rng(seed)
    curve, start = [], 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        rng.setstate(resume["rng"])
        curve, start = list(resume["curve"]), int(resume["step"])
    model.train()
    for step in range(start, steps):
        t0 = time.time()
        ids, labels = task.batch(rng, batch_size)  # [B, context] each
        targets = int((labels[:, 1:] != -100).sum())
        # logits only where a target is: the last `keep` positions
        first_target = int((labels != -100).float().argmax(dim=1).min())
        keep = ids.shape[1] - first_target + 1
        total = torch.zeros((), device=device)
        for lo in range(0, batch_size, micro_batch):
            x = ids[lo : lo + micro_batch].to(device)
            y = labels[lo : lo + micro_batch, ids.shape[1] - keep + 1 :].to(device)
            with autocast():
                logits = model(input_ids=x, use_cache=False, logits_to_keep=keep).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            (loss / targets).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        step_lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        curve.append({"step": step + 1, "loss": round(float(total) / targets, 6), "lr": step_lr,
                      "step_s": round(time.time() - t0, 4)})
        if save is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save({"step": step + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict(), "rng": rng.getstate(), "curve": curve})
    model.eval()
    return curve


# ------------------------------------------------------------------------------------------------------ a worker
class Worker:
    """A model, its pristine weights, tokenizer, tasks and held-out text, on one device; runs jobs one by one."""

    def __init__(self, args, device):
        import contextlib

        import torch

        from ..models import load_model
        from .perplexity import load_text

        self.args, self.device = args, device
        if args.model_config == "tiny":
            from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

            from ..models import default_gguf

            folder, gguf = default_gguf()
            self.tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
            torch.manual_seed(0)
            longest = max(c for _, c in parse_tasks(args.tasks))
            config = LlamaConfig(vocab_size=len(self.tok), max_position_embeddings=longest, **TINY)
            self.model = LlamaForCausalLM(config)
        else:
            self.model, self.tok = load_model(dtype="float32")
        self.model.to(device)
        self.state = {k: v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}
        cuda = device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
        pydoc = load_text("pydoc")[: args.filler_chars] if args.filler_chars else load_text("pydoc")
        ids = self.tok(pydoc, return_tensors="pt", add_special_tokens=False).input_ids[0]
        half = ids.numel() // 2
        self.filler = (ids[:half], ids[half:])
        heldout = load_text("stdlib")
        self.heldout = heldout[: args.heldout_chars] if args.heldout_chars else heldout
        from .stamp import machine_stamp

        self.stamp = machine_stamp(device)

    def tasks(self, job: Job):
        from .retrieval import make_task

        return (make_task(job.task, self.tok, self.filler[0], job.context),
                make_task(job.task, self.tok, self.filler[1], job.context))

    def perplexity(self, context: int) -> float:
        from .perplexity import perplexity

        with self.autocast():
            return perplexity(self.model, self.tok, self.heldout, context=context,
                              max_windows=self.args.ppl_windows)["ppl"]

    def load_checkpoint(self, path: str, job: Job) -> dict | None:
        """The saved mid-fine-tune state of ``job`` (same steps and prompts), or None."""
        import torch

        if not os.path.exists(path):
            return None
        state = torch.load(path, map_location=self.device, weights_only=False)
        return state if state.get("key") == list(job_key(job, self.args)) else None

    def run(self, job: Job) -> dict:
        import torch

        import ppa_hf

        from .retrieval import eval_set, keys_at_query
        from .stamp import utc_now
        from .stats import wilson_interval

        args = self.args
        t0 = time.time()
        self.model.load_state_dict(self.state)
        ppa_hf.apply(self.model, p=job.p, window=args.window, sink_tokens=args.sink_tokens, backend=args.backend,
                     granularity=job.granularity, block_size=args.block_size)
        train_task, eval_task = self.tasks(job)
        samples = eval_set(eval_task, args.n_eval, job.seed)
        eval_batch = max(1, args.eval_tokens // job.context)
        ckpt = os.path.join(args.out_dir, "checkpoints", job.name + ".pt")
        resume = self.load_checkpoint(ckpt, job)
        if resume is None:
            before = score(self.model, samples, eval_batch, self.autocast)
            ppl_before = self.perplexity(job.context)
        else:  # a run cut during its fine-tune: the measurements before it were saved with the checkpoint
            before, ppl_before = resume["before"], resume["ppl_before"]
            print(f"[{job.name}] resuming at step {resume['step']}", flush=True)

        def save(state):
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            state.update(key=list(job_key(job, args)), before=before, ppl_before=ppl_before)
            torch.save(state, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)

        t_train = time.time()
        micro = max(1, min(args.batch_size, args.micro_tokens // job.context))
        curve = finetune(self.model, train_task, job.seed, args.steps, args.batch_size, micro, args.lr,
                         args.warmup, self.autocast, resume=resume, checkpoint_every=args.checkpoint_every,
                         save=save)
        train_s = time.time() - t_train
        after = score(self.model, samples, eval_batch, self.autocast)
        ppl_after = self.perplexity(job.context)
        # per-run files first, the CSV row last: a row in the CSV means its files are complete
        for sub in ("curves", "prompts"):
            os.makedirs(os.path.join(args.out_dir, sub), exist_ok=True)
        with open(os.path.join(args.out_dir, "curves", job.name + ".jsonl"), "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in curve)
        with open(os.path.join(args.out_dir, "prompts", job.name + ".jsonl"), "w") as handle:
            for i, (s, b, a) in enumerate(zip(samples, before, after)):
                rec = {"index": i, "answer": s["answer_text"], "depth": round(s["depth"], 4),
                       "pred_before": self.tok.decode(b["pred"]), "ok_before": b["ok"], "logp_before": b["logp"],
                       "pred_after": self.tok.decode(a["pred"]), "ok_after": a["ok"], "logp_after": a["logp"]}
                if "asked" in s:
                    rec["asked"] = s["asked"]
                handle.write(json.dumps(rec) + "\n")
        n = len(samples)
        k_after, k_before = sum(r["ok"] for r in after), sum(r["ok"] for r in before)
        lo, hi = wilson_interval(k_after, n)
        blo, bhi = wilson_interval(k_before, n)
        losses = [r["loss"] for r in curve]
        flat = flatness(losses, args.flat_frac, args.flat_abs, args.flat_rel)
        answer_query = len(samples[0]["prompt"]) - 1
        row = {"task": job.task, "granularity": job.granularity, "p": job.p, "seed": job.seed,
               "context": job.context, "n_eval": n, "n_correct": k_after, "acc": round(k_after / n, 4),
               "acc_ci_low": round(lo, 4), "acc_ci_high": round(hi, 4), "n_correct_before": k_before,
               "acc_before": round(k_before / n, 4), "acc_before_ci_low": round(blo, 4),
               "acc_before_ci_high": round(bhi, 4),
               "final_loss": round(flat["loss_last"], 6), "loss_prev": round(flat["loss_prev"], 6),
               "flat": flat["flat"], "flat_step": flat["flat_step"],
               "mean_logp_before": round(sum(r["logp"] for r in before) / n, 4),
               "mean_logp_after": round(sum(r["logp"] for r in after) / n, 4),
               "ppl_before": round(ppl_before, 4), "ppl_after": round(ppl_after, 4),
               "keys_at_answer": keys_at_query(answer_query, job.p, args.window, args.sink_tokens, job.granularity,
                                               args.block_size),
               "answer_query": answer_query, "steps": args.steps, "batch_size": args.batch_size,
               "micro_batch": micro, "lr": args.lr, "warmup": args.warmup, "window": args.window,
               "sink_tokens": args.sink_tokens, "block_size": args.block_size, "backend": args.backend,
               "model": args.model_config or "SmolLM2-135M-Instruct",
               "resumed_at_step": resume["step"] if resume else 0, "train_seconds": round(train_s, 1),
               "step_s_median": sorted(r["step_s"] for r in curve)[len(curve) // 2]
               if curve else "", "seconds": round(time.time() - t0, 1),
               **{k: v for k, v in self.stamp.items() if k != "date"}, "date": utc_now()}
        return row


def _work(job_queue, args, device, rank: int) -> None:
    """Run jobs from ``job_queue`` until a ``None``; a failing run is logged to errors.jsonl, not fatal."""
    worker = Worker(args, device)
    while True:
        item = job_queue.get() if hasattr(job_queue, "get") else (job_queue.pop(0) if job_queue else None)
        if item is None:
            return
        job = Job(**item)
        if job_key(job, args) in done_keys(args.out_dir):
            continue
        try:
            row = worker.run(job)
        except Exception as err:  # noqa: BLE001 - one failed run must not stop the grid; it is recorded
            _append_jsonl(os.path.join(args.out_dir, "errors.jsonl"),
                          {"run": job.name, "worker": rank, "error": repr(err), "traceback": traceback.format_exc()})
            print(f"[worker {rank}] {job.name} FAILED: {err!r}", flush=True)
            continue
        row["worker"] = rank
        append_row(args.out_dir, row)
        ckpt = os.path.join(args.out_dir, "checkpoints", job.name + ".pt")
        if os.path.exists(ckpt):  # the row supersedes the mid-fine-tune state
            os.remove(ckpt)
        print(json.dumps(row), flush=True)


def _spawned(rank: int, gpu: int | None, job_queue, args) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if gpu is not None:
        torch.cuda.set_device(gpu)
        device = torch.device("cuda", gpu)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    _work(job_queue, args, device, rank)


def run(args) -> int:
    """Run every job of the grid that the CSV does not hold yet, then :func:`summarize`."""
    import torch

    os.makedirs(args.out_dir, exist_ok=True)
    done = done_keys(args.out_dir)
    todo = [j for j in plan(args) if job_key(j, args) not in done]
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() and not args.cpu else 0
    per = args.workers_per_gpu
    n_workers = min(len(todo), per * max(1, n_gpus))
    print(f"scurve_runs: {len(todo)} runs to do ({len(done)} already in {CSV_NAME}); {n_gpus} GPU(s), "
          f"{n_workers} worker(s)", flush=True)
    with open(os.path.join(args.out_dir, "run_args.json"), "w") as handle:
        json.dump({k: v for k, v in vars(args).items() if not callable(v)}, handle, indent=1)
    if todo and n_workers <= 1 and n_gpus <= 1:
        device = torch.device("cuda", 0) if n_gpus else torch.device("cpu")
        _work([asdict(j) for j in todo], args, device, 0)
    elif todo:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        job_queue = ctx.Queue()
        for job in todo:
            job_queue.put(asdict(job))
        for _ in range(n_workers):
            job_queue.put(None)
        procs = [ctx.Process(target=_spawned, args=(rank, (rank % n_gpus) if n_gpus else None, job_queue, args))
                 for rank in range(n_workers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        bad = [rank for rank, proc in enumerate(procs) if proc.exitcode != 0]
        if bad:
            print(f"scurve_runs: worker(s) {bad} exited abnormally (see the log); finished runs are in the CSV",
                  flush=True)
    summarize(args.out_dir)
    missing = [j.name for j in plan(args) if job_key(j, args) not in done_keys(args.out_dir)]
    if missing:
        print(f"scurve_runs: {len(missing)} run(s) not done: {', '.join(missing[:20])}"
              + (" ..." if len(missing) > 20 else ""), flush=True)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------------ summary
def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def _groups(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], int(r["context"]), r["granularity"], float(r["p"])), []).append(r)
    return groups


def _is_true(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def pooled(rows, field: str = "n_correct") -> tuple[int, int]:
    return sum(int(r[field]) for r in rows), sum(int(r["n_eval"]) for r in rows)


def plateau_statement(points: dict) -> str:
    """A sentence on the token curve of one task/context from pooled Wilson intervals: ``points`` maps ``p`` to
    ``(correct, n)``. A p < 1 "reaches" full attention when the data cannot tell them apart: its 95% interval
    overlaps full attention's AND Fisher's exact test does not reject equal accuracy at the 5% level (overlapping
    intervals alone can hide a significant difference: 194/200 against 200/200 overlap, Fisher p = 0.03). A plateau
    below 1 starts at the lowest p from which every measured p < 1 reaches it."""
    from .stats import fisher_proportions, wilson_interval

    if 1.0 not in points:
        return "Full attention (p = 1) was not measured: no statement on a plateau."
    fk, fn = points[1.0]
    flo, fhi = wilson_interval(fk, fn)
    below = sorted(p for p in points if p < 1.0)
    if not below:
        return "No p < 1 was measured: no statement on a plateau."
    lk, ln = points[below[0]]
    if wilson_interval(lk, ln)[1] >= flo:
        return (f"Full attention ({fk / fn:.3f} [{flo:.3f}, {fhi:.3f}]) is not above the lowest p measured "
                f"(p = {below[0]:g}: {lk / ln:.3f} [{wilson_interval(lk, ln)[0]:.3f}, {wilson_interval(lk, ln)[1]:.3f}]"
                "; the 95% intervals overlap): there is no rise to describe, so no statement on a plateau.")
    reach = {p: wilson_interval(*points[p])[1] >= flo and fisher_proportions(*points[p], fk, fn) >= 0.05
             for p in below}
    start = None
    for p in reversed(below):
        if not reach[p]:
            break
        start = p
    full = f"full attention {fk / fn:.3f} [{flo:.3f}, {fhi:.3f}] (n = {fn})"
    if start is None:
        best = max(below, key=lambda p: points[p][0] / points[p][1])
        bk, bn = points[best]
        blo, bhi = wilson_interval(bk, bn)
        hk, hn = points[below[-1]]
        overlap = wilson_interval(hk, hn)[1] >= flo
        why = ("its 95% interval overlaps, but Fisher's exact test tells them apart" if overlap
               else "its 95% interval lies below")
        return (f"No plateau below p = 1: the highest p < 1 measured (p = {below[-1]:g}) does not reach {full} "
                f"({why}); the best p < 1 is p = {best:g} with {bk / bn:.3f} [{blo:.3f}, {bhi:.3f}] "
                f"(Fisher's exact test against full attention: p = {fisher_proportions(bk, bn, fk, fn):.2g}).")
    sk, sn = points[start]
    slo, shi = wilson_interval(sk, sn)
    others = [p for p in below if p < start and reach[p]]
    note = (f" (lower p that also reach it, not followed by a run of such points: "
            f"{', '.join(f'{p:g}' for p in others)})" if others else "")
    return (f"Plateau below p = 1 from p = {start:g}: every measured p in [{start:g}, 1) is indistinguishable from "
            f"{full} (overlapping 95% intervals, Fisher's exact test p >= 0.05); at p = {start:g}: {sk / sn:.3f} "
            f"[{slo:.3f}, {shi:.3f}] (Fisher's exact test against full attention: "
            f"p = {fisher_proportions(sk, sn, fk, fn):.2g}){note}.")


def paired_tests(out_dir: str, rows) -> list[dict]:
    """Exact McNemar test of block against token at each (task, context, p, seed) where both ran (same prompts)."""
    from .stats import mcnemar_paired

    def outcomes(r):
        job = Job(r["task"], int(r["context"]), r["granularity"], float(r["p"]), int(r["seed"]))
        path = os.path.join(out_dir, "prompts", job.name + ".jsonl")
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            return [json.loads(line)["ok_after"] for line in handle if line.strip()]

    index = {(r["task"], int(r["context"]), r["granularity"], float(r["p"]), int(r["seed"]), int(r["steps"]),
              int(r["n_eval"])): r for r in rows}
    out = []
    for (task, ctx, gran, p, seed, steps, n), block in sorted(index.items()):
        token = index.get((task, ctx, "token", p, seed, steps, n))
        if gran != "block" or token is None:
            continue
        tb, tt = outcomes(block), outcomes(token)
        if tb is None or tt is None:
            continue
        test = mcnemar_paired(tt, tb)
        out.append({"task": task, "context": ctx, "p": p, "seed": seed, "n": test["n"],
                    "token_acc": round(sum(tt) / len(tt), 4), "block_acc": round(sum(tb) / len(tb), 4),
                    "only_token": test["only_first"], "only_block": test["only_second"],
                    "mcnemar_p": round(test["p_value"], 6)})
    return out


def summarize(out_dir: str) -> str:
    """Build ``summary.md``, ``paired_tests.csv`` and the plots from ``scurve_runs.csv`` and ``prompts/``; returns
    the summary's text."""
    from .stats import wilson_interval

    rows = read_rows(out_dir)
    lines = ["# Fine-tuned retrieval against p: summary of scurve_runs.csv", ""]
    if not rows:
        lines.append("No finished run in scurve_runs.csv yet.")
        text = "\n".join(lines) + "\n"
        with open(os.path.join(out_dir, "summary.md"), "w") as handle:
            handle.write(text)
        return text
    stamps = sorted({(r.get("gpu", ""), r.get("torch", ""), r.get("transformers", ""), r.get("python", ""),
                      r.get("commit", "")) for r in rows})
    lines.append(f"{len(rows)} runs, {rows[0].get('model', '')}, from {min(r.get('date', '') for r in rows)} to "
                 f"{max(r.get('date', '') for r in rows)}; machines (GPU, torch, transformers, Python, commit):")
    lines += [f"* {', '.join(s)}" for s in stamps]
    budgets = sorted({int(r["steps"]) for r in rows})
    not_flat = [r for r in rows if not _is_true(r.get("flat"))]
    slowest = max(rows, key=lambda r: int(r.get("flat_step") or 0))
    slowest_name = Job(slowest["task"], int(slowest["context"]), slowest["granularity"], float(slowest["p"]),
                       int(slowest["seed"])).name
    lines += ["", f"Training budget: {', '.join(map(str, budgets))} steps for every run. Loss curve flat (last 10% "
              f"of the steps within tolerance of the 10% before): {len(rows) - len(not_flat)} of {len(rows)} runs. "
              f"Latest flattening: step {slowest.get('flat_step')} ({slowest_name})."]
    if len(budgets) > 1 or len({r["n_eval"] for r in rows}) > 1:
        lines.append("**This CSV mixes training budgets or evaluation sizes; the pooled figures below mix them too. "
                     "Give each budget its own --out-dir.**")
    if not_flat:
        names = [Job(r["task"], int(r["context"]), r["granularity"], float(r["p"]), int(r["seed"])).name
                 for r in not_flat]
        lines.append(f"**Not flat: {', '.join(names)}. The budget is too small for these runs: the curve below is "
                     "not a converged one; rerun with a larger --steps.**")
    timing = []
    for ctx in sorted({int(r["context"]) for r in rows}):
        at = [r for r in rows if int(r["context"]) == ctx]
        step = _median([float(r["step_s_median"]) for r in at])
        other = _median([float(r["seconds"]) - float(r["train_seconds"]) for r in at])
        whole = _median([float(r["seconds"]) for r in at])
        timing.append(f"context {ctx}: median step {step:.3f} s, evaluation and perplexity {other:.1f} s, whole run "
                      f"{whole:.1f} s (medians)")
    lines += ["", "Timing (per run, as measured; concurrent runs share a GPU): " + "; ".join(timing) + "."]
    groups = _groups(rows)
    curves = sorted({(k[0], k[1]) for k in groups})
    for task, ctx in curves:
        lines += ["", f"## {task}, context {ctx}", "",
                  "| granularity | p | seeds | acc. per seed | acc. pooled [95%] | acc. before pooled [95%] | final "
                  "loss (mean) | flat | ppl before → after (mean) | keys at answer |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        token_points = {}
        for gran in ("token", "block"):
            for p in sorted(p for (t, c, g, p) in groups if (t, c, g) == (task, ctx, gran)):
                rs = sorted(groups[(task, ctx, gran, p)], key=lambda r: int(r["seed"]))
                k, n = pooled(rs)
                kb, _ = pooled(rs, "n_correct_before")
                lo, hi = wilson_interval(k, n)
                blo, bhi = wilson_interval(kb, n)
                if gran == "token":
                    token_points[p] = (k, n)
                mean = lambda f: sum(float(r[f]) for r in rs) / len(rs)  # noqa: E731
                seeds = ", ".join(r["seed"] for r in rs)
                accs = ", ".join("%.3f" % float(r["acc"]) for r in rs)
                lines.append(
                    f"| {gran} | {p:g} | {seeds} | {accs} | {k / n:.3f} [{lo:.3f}, {hi:.3f}] | "
                    f"{kb / n:.3f} [{blo:.3f}, {bhi:.3f}] | {mean('final_loss'):.4g} | "
                    f"{sum(_is_true(r['flat']) for r in rs)}/{len(rs)} | {mean('ppl_before'):.4g} → "
                    f"{mean('ppl_after'):.4g} | {rs[0]['keys_at_answer']} |")
        lines += ["", "Token pattern: " + plateau_statement(token_points)]
        plot_curve(out_dir, task, ctx, groups)
        plot_learning(out_dir, task, ctx, rows)
    tests = paired_tests(out_dir, rows)
    if tests:
        with open(os.path.join(out_dir, "paired_tests.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(tests[0]))
            writer.writeheader()
            writer.writerows(tests)
        lines += ["", "## Block vs token, paired by prompt (exact McNemar test)", "",
                  "| task | context | p | seed | n | token acc. | block acc. | only token right | only block right | "
                  "McNemar p |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {t['task']} | {t['context']} | {t['p']:g} | {t['seed']} | {t['n']} | {t['token_acc']:.3f} | "
                  f"{t['block_acc']:.3f} | {t['only_token']} | {t['only_block']} | {t['mcnemar_p']:.3g} |"
                  for t in tests]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "summary.md"), "w") as handle:
        handle.write(text)
    return text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(out_dir: str, task: str, ctx: int, groups) -> str:
    """Accuracy against p with pooled Wilson 95% intervals (after: filled, before: hollow), per-seed points."""
    from .stats import wilson_interval

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for gran, color in (("token", "C0"), ("block", "C3")):
        ps = sorted(p for (t, c, g, p) in groups if (t, c, g) == (task, ctx, gran))
        if not ps:
            continue
        for field, fill, label in (("n_correct", True, "after fine-tune"), ("n_correct_before", False, "before")):
            ys, lows, highs = [], [], []
            for p in ps:
                k, n = pooled(groups[(task, ctx, gran, p)], field)
                lo, hi = wilson_interval(k, n)
                ys.append(k / n)
                lows.append(k / n - lo)
                highs.append(hi - k / n)
            ax.errorbar(ps, ys, yerr=[lows, highs], color=color, marker="o", capsize=3,
                        ls="-" if fill else ":", mfc=color if fill else "white", label=f"{gran}, {label}")
        for p in ps:
            seeds = [float(r["acc"]) for r in groups[(task, ctx, gran, p)]]
            ax.scatter([p] * len(seeds), seeds, color=color, s=8, alpha=0.4)
    ax.set_xlabel("p")
    ax.set_ylabel("exact-match accuracy (pooled over seeds, Wilson 95%)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{task}, context {ctx}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, f"scurve_{task}_{ctx}.png")
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_learning(out_dir: str, task: str, ctx: int, rows) -> str | None:
    """Training loss against step (moving mean over 10% of the steps), one line per run of this task/context."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    drawn = 0
    cmap = plt.get_cmap("viridis")
    for r in sorted(rows, key=lambda r: (r["granularity"], float(r["p"]), int(r["seed"]))):
        if (r["task"], int(r["context"])) != (task, ctx):
            continue
        job = Job(r["task"], int(r["context"]), r["granularity"], float(r["p"]), int(r["seed"]))
        path = os.path.join(out_dir, "curves", job.name + ".jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as handle:
            losses = [json.loads(line)["loss"] for line in handle if line.strip()]
        w = max(1, len(losses) // 10)
        smooth = [sum(losses[max(0, i - w + 1) : i + 1]) / len(losses[max(0, i - w + 1) : i + 1])
                  for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, color=cmap(float(r["p"])), lw=1,
                ls="-" if r["granularity"] == "token" else "--",
                label=f"{r['granularity']} p={float(r['p']):g}" if int(r["seed"]) == min(
                    int(x["seed"]) for x in rows) else None)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss per answer token (moving mean)")
    ax.set_title(f"learning curves, {task}, context {ctx} (dashed: block)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = os.path.join(out_dir, f"curves_{task}_{ctx}.png")
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------- cli
def build_parser() -> argparse.ArgumentParser:
    from .options import add_ppa_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the grid (skipping finished runs), then summarize")
    r.add_argument("--out-dir", required=True)
    r.add_argument("--smoke", action="store_true",
                   help=f"the reduced grid {SMOKE} (explicit options given after it still win)")
    r.add_argument("--tasks", nargs="+", default=None, help=f"TASK:CONTEXT entries (default {' '.join(TASKS)})")
    r.add_argument("--token-ps", type=float, nargs="*", default=None)
    r.add_argument("--block-ps", type=float, nargs="*", default=None)
    r.add_argument("--seeds", type=int, nargs="+", default=None)
    r.add_argument("--n-eval", type=int, default=None, help="evaluation prompts per run (default 500)")
    r.add_argument("--steps", type=int, default=None, help="training steps, the same for every run (default 600)")
    r.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    r.add_argument("--micro-tokens", type=int, default=16384,
                   help="tokens per forward/backward (micro-batch = this // context, at least 1)")
    r.add_argument("--eval-tokens", type=int, default=65536, help="tokens per evaluation forward")
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--warmup", type=int, default=10)
    r.add_argument("--ppl-windows", type=int, default=8, help="held-out perplexity windows (of the run's context)")
    r.add_argument("--flat-frac", type=float, default=0.1)
    r.add_argument("--flat-abs", type=float, default=0.02)
    r.add_argument("--flat-rel", type=float, default=0.05)
    r.add_argument("--checkpoint-every", type=int, default=100,
                   help="save a run's fine-tune state every N steps, so a cut run resumes there (0: never)")
    r.add_argument("--workers-per-gpu", type=int, default=4,
                   help="concurrent runs per GPU (on CPU: worker processes; 1 runs in this process)")
    r.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is there")
    r.add_argument("--model-config", choices=["tiny"], default=None,
                   help="tiny: a random-init 2-layer Llama with the SmolLM2 tokenizer (tests)")
    r.add_argument("--filler-chars", type=int, default=0, help="use only this many characters of pydoc (tests)")
    r.add_argument("--heldout-chars", type=int, default=0, help="use only this many characters of stdlib (tests)")
    add_ppa_arguments(r, omit=("p", "granularity"), defaults={"backend": "auto"})
    r.set_defaults(func=_cmd_run)
    s = sub.add_parser("summary", help="rebuild summary.md, paired_tests.csv and the plots from the CSV")
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=lambda a: print(summarize(a.out_dir)) or 0)
    return parser


def resolve(args) -> argparse.Namespace:
    """Fill unset grid options from ``--smoke`` or the full defaults; validate."""
    from ..pattern import check_p
    from .options import ppa_settings

    full = dict(tasks=TASKS, token_ps=TOKEN_PS, block_ps=BLOCK_PS, seeds=[0, 1, 2], n_eval=500, steps=600)
    preset = {**full, **SMOKE} if args.smoke else full
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, list(value) if isinstance(value, list) else value)
    parse_tasks(args.tasks)
    args.token_ps = [check_p(p, "--token-ps") for p in args.token_ps]
    args.block_ps = [check_p(p, "--block-ps") for p in args.block_ps]
    for name in ("n_eval", "steps", "batch_size", "micro_tokens", "eval_tokens", "workers_per_gpu", "ppl_windows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    settings = ppa_settings(args)
    vars(args).update(settings)
    return args


def _cmd_run(args) -> int:
    return run(args)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        try:
            resolve(args)
        except ValueError as err:
            parser.error(str(err))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
