"""Supervised fine-tuning with PPA through Accelerate (and PEFT LoRA): the library behind examples/finetune.py.

Run ``accelerate launch examples/finetune.py ...`` (any number of processes) or ``python examples/finetune.py``.

Data order does not depend on the number of processes: one seeded permutation of the examples (a new one
each epoch); optimizer step ``k`` consumes examples ``[k*G, (k+1)*G)`` of that stream, where the global batch
``G = batch_size * grad_accum * num_processes``, each process taking its own slice (with ``--context-parallel N``,
``num_processes / N`` data-parallel replicas each take a slice, and the N processes of a replica split each of its
sequences, see :mod:`ppa_hf.hf.context_parallel`). So a run stopped at step
``N`` resumes at step ``N`` on another number of processes and, with the same ``G``, sees the same examples.

Output directory::

    config.json / model.safetensors / tokenizer*   the final model (LoRA merged), config carries ppa_* fields
    adapter/                                      the LoRA adapter alone (when --lora-r > 0)
    checkpoints/step-N/                           accelerate state (model, optimizer, scheduler, RNG) +
                                                  trainer_state.json {"step", "examples_seen", ...}
    train_log.jsonl                               one line per optimizer step: loss, lr, tokens/s, memory
    run_args.json                                 the arguments of the (last) run

:func:`train` in steps: :func:`setup_accelerator`, :func:`resolve_resume`, :func:`build_run` (tokenizer, features,
model, optimizer, scheduler), :func:`resume_run`, :func:`start_log`, :func:`train_loop` (one :func:`train_step` per
optimizer step; a callback writes the log and the checkpoints), :func:`save_final`. ``train_loop`` takes any data
source (``step -> micro-batches``), so other loops reuse it: examples/results.py fine-tunes on passkey batches
built in memory through it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass

MODEL_CONFIGS = {
    # random-init shapes for throughput runs (no weights are downloaded)
    "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
}
LOG_NAME = "train_log.jsonl"
STATE_NAME = "trainer_state.json"


def build_parser() -> argparse.ArgumentParser:
    from .options import add_ppa_arguments

    parser = argparse.ArgumentParser(description="Fine-tune a causal LM with Power-based Partial Attention.")
    add = parser.add_argument
    add("--model", default=None, help="model directory or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    add("--gguf-file", default=None, help="GGUF file inside --model")
    add("--model-config", default=None, choices=sorted(MODEL_CONFIGS),
        help="random-init model of this shape instead of --model (throughput runs)")
    add("--tokenizer", default=None, help="tokenizer for --model-config (default: the SmolLM2 tokenizer)")
    add_ppa_arguments(parser, defaults={"p": "0.75"})
    add("--train-file", default=None, help="local JSONL of GSM8K or MATH records (default: Hub GSM8K train)")
    add("--synthetic-data", action="store_true", help="random token sequences of --seq-len (throughput runs)")
    add("--output-dir", required=True)
    add("--max-steps", type=int, default=100, help="optimizer steps")
    add("--seq-len", type=int, default=512, help="longest example in tokens (longer ones are cut)")
    add("--batch-size", type=int, default=4, help="examples per process per micro-step")
    add("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    add("--context-parallel", type=int, default=1,
        help="split each example's sequence over N processes (N divides the process count; the rest is data "
             "parallel); 1: off")
    add("--lr", type=float, default=1e-4)
    add("--weight-decay", type=float, default=0.0)
    add("--warmup-steps", type=int, default=0)
    add("--lora-r", type=int, default=16, help="LoRA rank; 0 = full fine-tune")
    add("--lora-alpha", type=int, default=32)
    add("--lora-dropout", type=float, default=0.0)
    add("--seed", type=int, default=0)
    add("--resume-from", default=None, help="checkpoint folder, or 'latest' (newest in --output-dir/checkpoints)")
    add("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    add("--keep-checkpoints", type=int, default=2, help="newest N checkpoints kept")
    add("--stop-after", type=int, default=None, help="stop (checkpointed) after this step, as if interrupted")
    add("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
        help="default: accelerate's config / launch flag")
    add("--gradient-checkpointing", action="store_true")
    add("--cpu", action="store_true", help="run on CPU even when a GPU is present (several processes: gloo)")
    add("--limit", type=int, default=None, help="use the first N training records only")
    add("--no-merge", action="store_true", help="LoRA: save only the adapter, not the merged model")
    add("--no-save", action="store_true", help="write no checkpoint and no final model, only the train log "
        "(throughput runs)")
    add("--no-progress", action="store_true")
    return parser


def check_args(args) -> None:
    """Validate every option before anything heavy happens (errors name option, value, allowed range)."""
    from ..pattern import check_int
    from .options import ppa_settings

    vars(args).update(ppa_settings(args))  # p, window, sink_tokens, backend, granularity, block_size
    for name, minimum in [("max_steps", 1), ("seq_len", 8), ("batch_size", 1), ("grad_accum", 1),
                          ("context_parallel", 1), ("lora_r", 0), ("save_every", 0), ("keep_checkpoints", 1)]:
        setattr(args, name, check_int(getattr(args, name), "--" + name.replace("_", "-"), minimum))
    if args.stop_after is not None:
        check_int(args.stop_after, "--stop-after", 1)
    if args.no_save and (args.save_every or args.stop_after is not None):
        raise ValueError("--no-save writes no checkpoint; it excludes --save-every and --stop-after")
    if args.limit is not None:
        check_int(args.limit, "--limit", 1)
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr={args.lr} is not allowed; --lr must be a positive number")
    if args.train_file is not None and not os.path.isfile(args.train_file):
        raise FileNotFoundError(f"--train-file={args.train_file!r}: file does not exist (a local JSONL file)")
    if args.model is not None and os.path.sep in args.model and not os.path.exists(args.model):
        raise FileNotFoundError(f"--model={args.model!r}: no such model folder")
    if args.model is not None and args.model_config is not None:
        raise ValueError("--model and --model-config exclude each other; give one")
    if args.resume_from not in (None, "latest") and not os.path.isdir(args.resume_from):
        raise FileNotFoundError(f"--resume-from={args.resume_from!r}: no such checkpoint folder")


# --------------------------------------------------------------------------------------------- building


def load_tokenizer(args):
    from transformers import AutoTokenizer

    from ..models import default_gguf

    if args.model is not None and args.model_config is None:
        kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
        tok = AutoTokenizer.from_pretrained(args.model, **kwargs)
    elif args.tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        folder, gguf = default_gguf()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(args, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import ppa_hf
    from ..models import default_gguf, load_causal_lm
    from .options import ppa_settings

    if args.model_config is not None:
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max(4096, args.seq_len),
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **MODEL_CONFIGS[args.model_config])
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config)
    else:
        path, gguf = (args.model, args.gguf_file) if args.model is not None else default_gguf()
        model = load_causal_lm(path, gguf, dtype=torch.float32)
    ppa_hf.apply(model, **ppa_settings(args))  # the whole PPA setting: it is saved in the model's config
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    if args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                   if any(name.endswith(n) for name, _ in model.named_modules())] or "all-linear"
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        with warnings.catch_warnings():
            # PEFT (0.21) reads the model's `is_gradient_checkpointing` property, which Transformers (5.2x) deprecated
            # in favour of `is_activation_checkpointing` and warns about on every read. The read is PEFT's own and
            # still answers correctly; this hides that one message and nothing else.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            model = get_peft_model(model, lora)
    return model


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer, through ``activation_checkpointing_enable``
    (Transformers' name since it deprecated ``gradient_checkpointing_enable``; the older name on releases that lack
    it, e.g. 5.17)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_features(args, tokenizer, is_main: bool):
    from .data import load_records, to_pairs, tokenize_pairs

    if args.synthetic_data:
        import torch

        g = torch.Generator().manual_seed(args.seed)
        n = max(64, args.batch_size * args.grad_accum * 16)
        ids = torch.randint(0, len(tokenizer), (n, args.seq_len), generator=g).tolist()
        return [{"input_ids": row, "labels": row} for row in ids]
    records, kind = load_records(args.train_file, None, split="train", limit=args.limit)
    features = tokenize_pairs(to_pairs(records, kind), tokenizer, args.seq_len)
    if is_main:
        print(f"data: {len(features)} {kind} examples from {args.train_file or 'the Hub'}", flush=True)
    return features


class StepSchedule:
    """The process-count-independent data order: example indices of (step, micro-step, rank)."""

    def __init__(self, n_examples: int, seed: int, batch_size: int, grad_accum: int, num_processes: int):
        self.n, self.seed = n_examples, seed
        self.bs, self.ga, self.np = batch_size, grad_accum, num_processes
        self.global_batch = batch_size * grad_accum * num_processes
        self._perms = {}

    def _perm(self, epoch: int):
        import torch

        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._perms[epoch]

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        start = step * self.global_batch + (micro * self.np + rank) * self.bs
        out = []
        for pos in range(start, start + self.bs):
            out.append(int(self._perm(pos // self.n)[pos % self.n]))
        return out


# ------------------------------------------------------------------------------------------ checkpoints


def checkpoint_dirs(output_dir: str) -> list[str]:
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [d for d in os.listdir(root) if d.startswith("step-") and d[5:].isdigit()
             and os.path.isfile(os.path.join(root, d, STATE_NAME))]
    return [os.path.join(root, d) for d in sorted(found, key=lambda d: int(d[5:]))]


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, keep: int) -> str:
    """Accelerate state into ``checkpoints/step-N``; ``trainer_state.json`` is written last (it marks a
    complete checkpoint: folders without it are ignored on resume)."""
    path = os.path.join(output_dir, "checkpoints", f"step-{step}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and os.path.isdir(path):
        shutil.rmtree(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(path, STATE_NAME + ".partial"), "w") as handle:
            json.dump(state, handle, indent=2)
        os.replace(os.path.join(path, STATE_NAME + ".partial"), os.path.join(path, STATE_NAME))
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def materialize_optimizer_state(optimizer) -> None:
    """Create the optimizer's per-parameter state (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq``) without changing a
    weight: one step on zero gradients at learning rate 0, gradients cleared afterwards.

    Why: Accelerate (1.15) loads a sharded FSDP optimizer checkpoint into a template taken from the live optimizer
    (``dist_cp.load`` fills only the keys the template has). A fresh AdamW has no state yet, so nothing was loaded
    and the run silently continued with new Adam moments (1B Llama on 2 H200s: loss 5.55 -> 10.15 at the first step
    after the resume). With the state created first, every tensor of the checkpoint has a place to go."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    saved_lrs = [group["lr"] for group in inner.param_groups]
    for group in inner.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
    inner.step()
    for group, lr in zip(inner.param_groups, saved_lrs):
        group["lr"] = lr
    inner.zero_grad(set_to_none=True)


def optimizer_step_count(optimizer) -> int | None:
    """The largest per-parameter ``step`` in the optimizer's state (Adam-family optimizers keep one), or None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    steps = [float(s["step"]) for s in getattr(inner, "state", {}).values() if isinstance(s, dict) and "step" in s]
    return int(max(steps)) if steps else None


def trim_log(path: str, step: int) -> None:
    """Keep the log lines of steps <= ``step`` (after a resume the later ones are redone)."""
    if not os.path.isfile(path):
        return
    with open(path) as handle:
        rows = [line for line in handle if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as handle:
        handle.writelines(rows)


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class TrainState:
    """Where a run stands: optimizer steps taken, examples and (non-padding) tokens consumed."""

    step: int = 0
    examples_seen: int = 0
    tokens_seen: int = 0


class ScheduledBatches:
    """The fine-tune's data source for :func:`train_loop`: step ``k`` -> (this process's micro-batches, target tokens
    of the global batch), in :class:`StepSchedule` order (independent of the process count).

    ``process_index`` is the data-parallel rank: under context parallelism the ranks of one CP group take the same
    examples (each then keeps its chunk of every sequence), and the schedule counts data-parallel replicas."""

    def __init__(self, features: list[dict], schedule: StepSchedule, pad_id: int, process_index: int):
        self.features, self.schedule, self.pad_id, self.rank = features, schedule, pad_id, process_index
        self.global_batch = schedule.global_batch
        self._targets = [sum(1 for label in f["labels"][1:] if label != -100) for f in features]

    def __call__(self, step: int) -> tuple[list[dict], int]:
        from .data import collate

        sched = self.schedule
        global_targets = sum(self._targets[i] for micro in range(sched.ga) for rank in range(sched.np)
                             for i in sched.indices(step, micro, rank))
        micro_batches = [collate([self.features[i] for i in sched.indices(step, micro, self.rank)], self.pad_id)
                         for micro in range(sched.ga)]
        return micro_batches, global_targets


def target_count(labels) -> int:
    """Next-token targets with a loss in ``labels [B, T]`` (-100 marks none; label 0 of a row has no logit)."""
    return int((labels[:, 1:] != -100).sum())


def train_step(accelerator, model, optimizer, scheduler, micro_batches: list[dict], global_targets: int,
               max_grad_norm: float = 1.0, context=None) -> dict:
    """One optimizer step: forward and backward over this process's ``micro_batches``, clip, step, schedule.

    Args:
        micro_batches: dicts of ``input_ids [B, T]`` long, ``labels [B, T]`` long (``labels[:, t]`` is the target
            of the logits at ``t - 1``, -100 where there is no loss) and optionally ``attention_mask [B, T]``
            (absent: no padding). Moved to ``accelerator.device`` here. Gradients of all but the last are
            accumulated without a DDP sync.
        global_targets: target tokens (labels != -100, see :func:`target_count`) of the global batch, i.e. of
            every micro-batch of every data-parallel replica (counted once, however many ranks share a sequence).
        context: a :class:`~ppa_hf.hf.context_parallel.ContextParallel`, or None. With it, every rank of a CP group
            gets the same micro-batches and runs the model on its own chunk of each sequence
            (:func:`~ppa_hf.hf.context_parallel.shard_batch`: targets shifted before the split, global positions).

    The loss is the mean over every target token of the global batch, whatever the process count: each process
    backpropagates (its token-loss sum) * num_processes / global_targets, and DDP averages over processes. Under
    context parallelism a rank's gradient also holds what the other ranks' queries contribute through its keys and
    values (the K/V all-gather's backward), so the sum over all ranks is the gradient of the whole loss.

    Returns ``{"loss": that mean (float), "lr": the learning rate this step used, "tokens": non-padding tokens of
    the global batch}``.
    """
    import torch

    from ..hf.context_parallel import shard_batch

    device = accelerator.device
    nproc = accelerator.num_processes
    config = accelerator.unwrap_model(model).config
    loss_sum = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device, dtype=torch.long)
    for micro, batch in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = batch.get("attention_mask")
        sync = micro == len(micro_batches) - 1
        ctx = accelerator.no_sync(model) if not sync and nproc > 1 else contextlib.nullcontext()
        with ctx, accelerator.autocast():
            inputs, targets = shard_batch(batch, context, config)  # targets [B, T]: of the logits at each position
            logits = model(**inputs, use_cache=False).logits.float()
            token_loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
            accelerator.backward(token_loss * nproc / global_targets)
        loss_sum += token_loss.detach()
        tokens += mask.sum() if mask is not None else batch["input_ids"].numel()
    if accelerator.sync_gradients:
        # all parameters (frozen ones have no gradient): under FSDP accelerate then uses the sharded model's
        # own clip, which takes the norm over every rank's shard; a subset would be clipped per shard
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    step_lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    sharing = context.size if context is not None else 1  # ranks that counted the same sequences' tokens
    return {"loss": float(accelerator.reduce(loss_sum, reduction="sum")) / global_targets, "lr": step_lr,
            "tokens": int(accelerator.reduce(tokens, reduction="sum")) // sharing}


def train_loop(accelerator, model, optimizer, scheduler, batches, last_step: int, global_batch: int,
               state: TrainState | None = None, on_step=None, max_grad_norm: float = 1.0,
               context=None) -> list[dict]:
    """Optimizer steps ``state.step + 1 .. last_step`` (logged by their number after the step); returns one log
    row per step (the rows of ``train_log.jsonl``).

    ``batches(step) -> (micro_batches, global_targets)`` is the data source (see :func:`train_step`):
    :class:`ScheduledBatches` for the fine-tune, anything else (e.g. batches built in memory) for other callers;
    ``global_batch`` is the number of examples one step consumes (all processes). ``on_step(state, row)`` runs
    after each step on every process (logging, checkpoints). ``state`` is updated in place. ``context``: context
    parallelism (see :func:`train_step`), or None.
    """
    import torch

    state = state if state is not None else TrainState()
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    started = time.time()
    rows = []
    while state.step < last_step:
        t0 = time.time()
        micro_batches, global_targets = batches(state.step)
        result = train_step(accelerator, model, optimizer, scheduler, micro_batches, global_targets, max_grad_norm,
                            context)
        state.step += 1
        state.examples_seen += global_batch
        state.tokens_seen += result["tokens"]
        dt = time.time() - t0
        row = {"step": state.step, "loss": round(result["loss"], 6), "lr": result["lr"], "tokens": result["tokens"],
               "tokens_per_s": round(result["tokens"] / dt, 1), "step_s": round(dt, 3),
               "elapsed_s": round(time.time() - started, 2), "num_processes": accelerator.num_processes,
               "context_parallel": context.size if context is not None else 1, "global_batch": global_batch}
        if device.type == "cuda":
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        rows.append(row)
        if on_step is not None:
            on_step(state, row)
    return rows


# ------------------------------------------------------------------------------------------ the fine-tune


@dataclass
class Run:
    """What :func:`train` builds: the accelerator and everything it prepared."""

    accelerator: object
    tokenizer: object
    features: list
    model: object
    optimizer: object
    scheduler: object
    deepspeed: bool
    context: object = None  # ContextParallel, or None

    @property
    def data_parallel(self) -> tuple[int, int]:
        """``(replicas, this process's replica)``: processes, unless context parallelism groups them."""
        if self.context is None:
            return self.accelerator.num_processes, self.accelerator.process_index
        return self.context.data_parallel_size, self.context.data_parallel_rank

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def setup_accelerator(args):
    """The ``Accelerator`` of the run (seeded); DeepSpeed with ``--grad-accum`` > 1 is refused."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # torchrun-style launch (accelerate's multi-process launcher) on a machine without GPUs: DDP over gloo
    cpu = args.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=cpu)
    set_seed(args.seed)
    if accelerator.distributed_type.name == "DEEPSPEED" and args.grad_accum != 1:
        raise ValueError(f"--grad-accum={args.grad_accum} with DeepSpeed: DeepSpeed steps the optimizer itself; use "
                         "--grad-accum 1 and set gradient_accumulation_steps in the DeepSpeed config")
    return accelerator


def resolve_resume(args) -> str | None:
    """The checkpoint folder ``--resume-from`` names (``latest``: the newest complete one), or None."""
    resume = args.resume_from
    if resume == "latest":
        found = checkpoint_dirs(args.output_dir)
        if not found:
            raise FileNotFoundError(f"--resume-from=latest: no checkpoint in {args.output_dir}/checkpoints")
        resume = found[-1]
    if resume is not None and not os.path.isfile(os.path.join(resume, STATE_NAME)):
        raise FileNotFoundError(f"--resume-from={resume!r}: not a complete checkpoint (no {STATE_NAME})")
    return resume


def lr_schedule(max_steps: int, warmup_steps: int = 0):
    """Multiplier of the learning rate at step ``s``: linear warm-up, then linear decay to 10 %."""

    def lr_lambda(step):
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1.0 - (step - warmup_steps) / max(1, max_steps - warmup_steps)) * 0.9 + 0.1

    return lr_lambda


def make_optimizer(model, lr: float, weight_decay: float = 0.0):
    """AdamW over the trainable parameters of ``model``."""
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def build_run(args, accelerator) -> Run:
    """Tokenizer, features, model (PPA on, LoRA), optimizer and scheduler, prepared by ``accelerator``."""
    import torch

    is_main = accelerator.is_main_process
    context = make_context(args, accelerator)
    tokenizer = load_tokenizer(args)
    features = build_features(args, tokenizer, is_main)
    model = build_model(args, tokenizer)
    if is_main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"model: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable; PPA p={args.p} "
              f"w={args.window} sinks={args.sink_tokens}; {accelerator.num_processes} process(es)"
              f"{f' (context parallel {context.size})' if context is not None else ''}, "
              f"mixed precision {accelerator.mixed_precision}, device {accelerator.device}", flush=True)
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    if deepspeed:  # DeepSpeed wraps model and optimizer in one engine
        model, optimizer = accelerator.prepare(model, make_optimizer(model, args.lr, args.weight_decay))
    else:  # FSDP shards the parameters when it wraps the model: the optimizer must see the wrapped ones
        model = accelerator.prepare(model)
        optimizer = accelerator.prepare(make_optimizer(model, args.lr, args.weight_decay))
    # the scheduler is stepped once per optimizer step whatever the process count (the data schedule is
    # global), so it is not prepared (accelerate would step it num_processes times); it is still checkpointed
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(args.max_steps, args.warmup_steps))
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(save_tied_weights_once)
    return Run(accelerator, tokenizer, features, model, optimizer, scheduler, deepspeed, context)


def make_context(args, accelerator):
    """The run's :class:`~ppa_hf.hf.context_parallel.ContextParallel` for ``--context-parallel N`` > 1 (else None):
    groups of N consecutive processes share each sequence. DDP only (accelerate's MULTI_CPU / MULTI_GPU): FSDP and
    DeepSpeed are refused (their gradient reduction with a sequence split over ranks is not tested)."""
    if args.context_parallel == 1:
        return None
    from ..hf.context_parallel import ContextParallel

    processes = accelerator.num_processes
    if processes % args.context_parallel:
        raise ValueError(f"--context-parallel={args.context_parallel} does not divide the number of processes "
                         f"({processes}); it must be 1 or a divisor of {processes} (launch more processes with "
                         "accelerate launch --num_processes or torchrun)")
    kind = accelerator.distributed_type.name
    if kind not in ("MULTI_CPU", "MULTI_GPU"):
        raise ValueError(f"--context-parallel={args.context_parallel} runs under DDP (accelerate's multi-process "
                         f"launch: MULTI_CPU or MULTI_GPU), not {kind}; use --context-parallel 1 there")
    return ContextParallel.create(args.context_parallel, "--context-parallel")


def resume_run(run: Run, resume: str) -> TrainState:
    """Load the checkpoint ``resume`` into ``run``; refuses one whose optimizer state did not come back."""
    accelerator, optimizer = run.accelerator, run.optimizer
    if not run.deepspeed:
        materialize_optimizer_state(optimizer)
    accelerator.load_state(resume)
    with open(os.path.join(resume, STATE_NAME)) as handle:
        state = json.load(handle)
    # a checkpoint records its optimizer's step count: resuming with other (e.g. fresh) moments is an error
    expected = state.get("optimizer_steps")
    if expected is not None and not run.deepspeed:
        restored = optimizer_step_count(optimizer)
        if restored != expected:
            raise RuntimeError(f"--resume-from={resume!r}: the optimizer state was not restored (its step count "
                               f"is {restored}, the checkpoint's {expected}); refusing to continue with other "
                               "moments")
    if run.is_main:
        print(f"resumed from {resume} at step {state['step']} (saved by {state.get('num_processes')} process(es))",
              flush=True)
    return TrainState(state["step"], state["examples_seen"], state.get("tokens_seen", 0))


def start_log(args, run: Run, state: TrainState, resumed: bool, global_batch: int) -> str:
    """Prepare ``train_log.jsonl`` (trimmed to the resumed step, or new) and write ``run_args.json``; returns
    the log path."""
    log_path = os.path.join(args.output_dir, LOG_NAME)
    if run.is_main:
        if resumed and state.examples_seen != state.step * global_batch:
            print(f"note: the global batch changed ({state.examples_seen // max(state.step, 1)} -> {global_batch}); "
                  "the data stream continues from the same step index", flush=True)
        os.makedirs(args.output_dir, exist_ok=True)
        if resumed:
            trim_log(log_path, state.step)
        elif os.path.exists(log_path):
            os.remove(log_path)
        with open(os.path.join(args.output_dir, "run_args.json"), "w") as handle:
            json.dump({**vars(args), "num_processes": run.accelerator.num_processes, "global_batch": global_batch},
                      handle, indent=2, default=str)
    run.accelerator.wait_for_everyone()
    return log_path


def checkpoint(args, run: Run, state: TrainState, global_batch: int) -> str:
    """Save ``checkpoints/step-N`` with the run's position (see :func:`save_checkpoint`)."""
    meta = {"step": state.step, "examples_seen": state.examples_seen, "tokens_seen": state.tokens_seen,
            "num_processes": run.accelerator.num_processes, "context_parallel": args.context_parallel,
            "global_batch": global_batch, "p": args.p,
            "optimizer_steps": None if run.deepspeed else optimizer_step_count(run.optimizer)}
    return save_checkpoint(run.accelerator, args.output_dir, state.step, meta, args.keep_checkpoints)


def train(args, end_process_group: bool = True) -> dict:
    """Run the fine-tune described by ``args`` (see :func:`build_parser`); returns a summary dict.
    ``end_process_group=False`` leaves a launch's process group up for what the caller runs next (a sweep
    evaluates the fine-tuned point over the same processes)."""
    from tqdm.auto import tqdm

    check_args(args)
    accelerator = setup_accelerator(args)
    resume = resolve_resume(args)
    run = build_run(args, accelerator)
    state = resume_run(run, resume) if resume is not None else TrainState()
    replicas, replica = run.data_parallel
    schedule = StepSchedule(len(run.features), args.seed, args.batch_size, args.grad_accum, replicas)
    log_path = start_log(args, run, state, resume is not None, schedule.global_batch)

    last = min(args.max_steps, args.stop_after) if args.stop_after else args.max_steps
    bar = tqdm(total=args.max_steps, initial=state.step, desc="fine-tune",
               disable=not run.is_main or args.no_progress, dynamic_ncols=True)

    def on_step(state: TrainState, row: dict) -> None:
        if run.is_main:
            with open(log_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
        if not args.no_save and ((args.save_every and state.step % args.save_every == 0) or state.step == last):
            checkpoint(args, run, state, schedule.global_batch)

    started = time.time()
    batches = ScheduledBatches(run.features, schedule, run.tokenizer.pad_token_id, replica)
    train_loop(accelerator, run.model, run.optimizer, run.scheduler, batches, last, batches.global_batch, state,
               on_step, context=run.context)
    bar.close()

    finished = state.step >= args.max_steps
    if finished and not args.no_save:
        save_final(accelerator, run.model, run.tokenizer, args)
    accelerator.wait_for_everyone()
    summary = {"step": state.step, "finished": finished, "output_dir": args.output_dir,
               "seconds": round(time.time() - started, 1), "num_processes": accelerator.num_processes}
    if run.is_main:
        print(json.dumps(summary), flush=True)
    if end_process_group and hasattr(accelerator, "end_training"):
        accelerator.end_training()
    return summary


# ------------------------------------------------------------------------------------------ final model


def save_final(accelerator, model, tokenizer, args) -> None:
    """The final model (LoRA merged unless --no-merge; the adapter also in ``adapter/``) with PPA in its config.
    Written to ``<output>/.final.partial`` and moved into place, so a crash leaves no half-written model."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    state_dict = drop_tied_copies(unwrapped, state_dict)
    tmp = os.path.join(args.output_dir, ".final.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if args.lora_r > 0:
        # the LoRA targets are linear projections and the vocabulary is never resized: the adapter holds no embedding
        # (PEFT's "auto" would look for the base model's config.json to find out, and a GGUF base has none)
        unwrapped.save_pretrained(os.path.join(tmp, "adapter"), state_dict=state_dict, save_embedding_layers=False)
        if not args.no_merge:
            merged = unwrapped.merge_and_unload()
            merged.save_pretrained(tmp)
    else:
        unwrapped.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for name in os.listdir(tmp):  # move into place, config.json last
        if name != "config.json":
            target = os.path.join(args.output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
    if os.path.exists(os.path.join(tmp, "config.json")):
        os.replace(os.path.join(tmp, "config.json"), os.path.join(args.output_dir, "config.json"))
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"saved the final model to {args.output_dir}", flush=True)


def save_tied_weights_once(models, weights, output_dir) -> None:
    """Accelerate ``save_state`` pre-hook: each model's state dict without the second names of tied weights (see
    :func:`drop_tied_copies`), so a checkpoint stores a tied embedding / LM head once. Without it accelerate finds
    the shared tensor itself, drops the second name and warns ("Removed shared tensor ... while saving");
    ``load_state`` ties the weights again either way. (FSDP and DeepSpeed save their models themselves: their
    ``weights`` list is empty.)"""
    for index, (model, state_dict) in enumerate(zip(models, weights)):
        weights[index] = drop_tied_copies(model, state_dict)


def drop_tied_copies(model, state_dict: dict) -> dict:
    """``state_dict`` without the second and later names of parameters the model shares (tied embeddings).

    A state dict gathered from FSDP shards holds a tied weight as separate tensors, which ``save_pretrained``
    cannot recognise as one and writes twice (1B Llama: 4.70 instead of 4.30 GB); loading ties them again."""
    names_by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
    copies = {name for names in names_by_param.values() for name in names[1:]}
    return {name: tensor for name, tensor in state_dict.items() if name not in copies}


def main(argv=None) -> int:
    import sys

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = train(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        return 2
    return 0 if summary["step"] > 0 else 1
