"""Results of docs/results.md: zero-shot patching, fine-tuned passkey retrieval against p, sinks, block vs token
granularity.

Every table and plot of docs/results.md comes from one of these subcommands (on one GPU: `make results-gpu`;
on CPU at small sizes):

    python examples/results.py zeroshot --out-dir OUT [--contexts 2048 8192] [--texts pydoc stdlib]
        [--ps ...] [--sinks 0 4] [--granularities token block] [--windows N]
    python examples/results.py scurve --out-dir OUT [--ps ...] [--seeds 0] [--knee-seeds 0 1 --knee 0.625 0.75]
        [--steps 120] [--context 2048] [--granularity token] [--gsm8k-limit 100]

zeroshot: perplexity of SmolLM2-135M-Instruct patched to PPA, per (text, context, p, sinks, granularity).
scurve: the paper's protocol at small scale on a task where long-range attention matters: for each p, the same
fine-tune (same data order, steps, learning rate, seed) on passkey retrieval (a 5-digit key hidden at a random
depth in natural text of ``--context`` tokens, asked for at the end; loss on the key only), then exact-match
retrieval accuracy on held-out prompts, held-out perplexity, and GSM8K 4-shot accuracy. One seed, one prompt set:
for a curve that can carry a claim (seeds that change the eval prompts, intervals, learning curves, per-prompt
results, several runs per GPU) use ``python -m ppa_hf.recipes.scurve_runs`` (docs/results.md section 6).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time

import torch

import ppa_hf
from ppa_hf.models import load_model
from ppa_hf.hf.settings import DEFAULTS, GRANULARITIES
from ppa_hf.pattern import check_int, check_p
from ppa_hf.recipes.options import add_ppa_arguments, ppa_settings
from ppa_hf.recipes.perplexity import load_text, perplexity

ZEROSHOT_PS = [0.0, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0]


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _append_csv(path, row):
    """Append ``row``; the header is the union of all rows' fields (rows of other runs may lack some)."""
    rows = []
    if os.path.exists(path):
        with open(path) as handle:
            rows = list(csv.DictReader(handle))
    rows.append(row)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _done(path, key_fields, row):
    if not os.path.exists(path):
        return False
    with open(path) as handle:
        return any(all(str(r[k]) == str(row[k]) for k in key_fields) for r in csv.DictReader(handle))


# ----------------------------------------------------------------------------------------------------- zeroshot
def zeroshot(args) -> int:
    device = _device()
    model, tok = load_model(dtype="bfloat16" if device.type == "cuda" else "float32")
    model.to(device).eval()
    path = os.path.join(args.out_dir, "zeroshot.csv")
    keys = ["text", "context", "granularity", "p", "sink_tokens"]
    for text_name in args.texts:
        text = load_text(text_name)
        for context in args.contexts:
            windows = max(1, args.tokens // context)
            for granularity in args.granularities:
                for sinks in args.sinks:
                    for p in args.ps:
                        row = {"text": text_name, "context": context, "granularity": granularity, "p": p,
                               "sink_tokens": sinks}
                        if _done(path, keys, row):
                            continue
                        ppa_hf.apply(model, p=p, window=args.window, sink_tokens=sinks, backend=args.backend,
                                     granularity=granularity, block_size=args.block_size)
                        t0 = time.time()
                        result = perplexity(model, tok, text, context=context, max_windows=windows,
                                            batch_size=args.batch_size)
                        row.update(window=args.window, tokens=result["tokens"], nll=round(result["nll"], 5),
                                   ppl=round(result["ppl"], 4), seconds=round(time.time() - t0, 2))
                        _append_csv(path, row)
                        print(json.dumps(row), flush=True)
    plot_zeroshot(path, args.out_dir)
    return 0


def plot_zeroshot(path, out_dir):
    from ppa_hf.recipes.plots import plot_metric_vs_p

    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    for text in sorted({r["text"] for r in rows}):
        series = {}
        for r in rows:
            if r["text"] != text:
                continue
            label = f"ctx {r['context']}, {r['sink_tokens']} sinks" + (", block" if r["granularity"] == "block" else "")
            series.setdefault(label, []).append((float(r["p"]), float(r["ppl"])))
        plot_metric_vs_p(os.path.join(out_dir, f"zeroshot_{text}.png"), series, "perplexity",
                         f"SmolLM2-135M-Instruct, zero-shot PPA (w=64), text '{text}'", logy=True)


# ------------------------------------------------------------------------------------------------------ passkey
class Passkey:
    """Passkey retrieval samples built in token space from a filler text (deterministic per seed)."""

    def __init__(self, tokenizer, filler_ids: torch.Tensor, context: int):
        self.tok, self.filler, self.context = tokenizer, filler_ids, context
        self.question = tokenizer(" What is the pass key? The pass key is", add_special_tokens=False).input_ids

    def sample(self, rng: random.Random):
        key = f"{rng.randrange(10000, 100000)}"
        needle = self.tok(f" The pass key is {key}. Remember it. {key} is the pass key.",
                          add_special_tokens=False).input_ids
        answer = self.tok(f" {key}", add_special_tokens=False).input_ids
        n_fill = self.context - len(needle) - len(self.question) - len(answer)
        start = rng.randrange(0, self.filler.numel() - n_fill)
        depth = rng.randrange(0, n_fill + 1)
        fill = self.filler[start : start + n_fill].tolist()
        prompt = fill[:depth] + needle + fill[depth:] + self.question
        return prompt, answer, key, depth

    def batch(self, rng, size):
        prompts, answers = zip(*[self.sample(rng)[:2] for _ in range(size)])
        ids = torch.tensor([p + a for p, a in zip(prompts, answers)])
        labels = ids.clone()
        for row, p in enumerate(prompts):
            labels[row, : len(p)] = -100  # loss on the key only
        return ids, labels


def passkey_accuracy(model, task: Passkey, n: int, seed: int, batch_size: int):
    device = next(model.parameters()).device
    rng = random.Random(seed)
    samples = [task.sample(rng) for _ in range(n)]
    correct, by_depth = 0, []
    for start in range(0, n, batch_size):
        chunk = samples[start : start + batch_size]
        ids = torch.tensor([s[0] for s in chunk], device=device)  # all prompts have the same length
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(chunk[0][1]) + 1,
                                 do_sample=False, pad_token_id=task.tok.pad_token_id)
        for s, row in zip(chunk, out):
            got = task.tok.decode(row[ids.shape[1]:], skip_special_tokens=True)
            ok = got.strip().startswith(s[2])
            correct += ok
            by_depth.append((s[3] / task.context, ok))
    return correct / n, by_depth


def finetune(model, task: Passkey, steps, batch_size, lr, seed, accelerator):
    """Fine-tune ``model`` on ``steps`` passkey batches through the training module's loop (the same step as
    examples/finetune.py): loss on the key tokens only, AdamW, gradient norm clipped at 1, this script's schedule
    (warm-up over 10 steps, then linear decay to 0). Returns the loss of each step."""
    from ppa_hf.recipes.training import make_optimizer, target_count, train_loop

    opt = make_optimizer(model, lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    rng = random.Random(seed)

    def batches(step):  # one micro-batch per step, drawn in step order from the seeded stream
        ids, labels = task.batch(rng, batch_size)  # [B, context] each; labels -100 except on the key
        return [{"input_ids": ids, "labels": labels}], target_count(labels)

    rows = train_loop(accelerator, model, opt, sched, batches, last_step=steps, global_batch=batch_size)
    model.eval()
    return [row["loss"] for row in rows]


def scurve(args) -> int:
    from accelerate import Accelerator

    device = _device()
    # bf16 autocast on a GPU, as before; the accelerator only runs the training step (nothing is prepared)
    accelerator = Accelerator(cpu=device.type != "cuda", mixed_precision="bf16" if device.type == "cuda" else "no")
    base, tok = load_model(dtype="float32")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    pydoc_ids = tok(load_text("pydoc"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    half = pydoc_ids.numel() // 2
    train_task = Passkey(tok, pydoc_ids[:half], args.context)
    eval_task = Passkey(tok, pydoc_ids[half:], args.context)
    heldout = load_text("stdlib")
    gsm_records = gsm_shots = None
    if args.gsm8k_limit:  # read directly: the GPU machine has no `datasets`/`evaluate`
        def read(name, n):
            with open(os.path.join(args.data_dir, "gsm8k", name)) as handle:
                return [json.loads(line) for line, _ in zip(handle, range(n))]

        gsm_records, gsm_shots = read("test.jsonl", args.gsm8k_limit), read("train.jsonl", 4)
    path = os.path.join(args.out_dir, "scurve.csv")
    runs = [(p, s) for p in args.ps for s in args.seeds]
    runs += [(p, s) for p in args.knee for s in args.knee_seeds if (p, s) not in runs]
    for p, seed in runs:
        row = {"task": "passkey", "granularity": args.granularity, "p": p, "seed": seed, "context": args.context,
               "steps": args.steps}
        if _done(path, ["granularity", "p", "seed", "context", "steps"], row):
            continue
        torch.manual_seed(seed)
        base.load_state_dict(state)
        model = base.to(device)
        ppa_hf.apply(model, p=p, window=args.window, sink_tokens=args.sink_tokens, backend=args.backend,
                     granularity=args.granularity, block_size=args.block_size)
        t0 = time.time()
        zero_acc, _ = passkey_accuracy(model, eval_task, args.eval_samples, 1234, args.eval_batch)
        losses = finetune(model, train_task, args.steps, args.batch_size, args.lr, seed, accelerator)
        train_s = time.time() - t0
        acc, by_depth = passkey_accuracy(model, eval_task, args.eval_samples, 1234, args.eval_batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            ppl = perplexity(model, tok, heldout, context=args.context, max_windows=args.ppl_windows)
        row.update(window=args.window, sink_tokens=args.sink_tokens, lr=args.lr, batch_size=args.batch_size,
                   zero_shot_passkey_acc=round(zero_acc, 4), passkey_acc=round(acc, 4),
                   final_loss=round(sum(losses[-10:]) / min(10, len(losses)), 4),
                   heldout_ppl=round(ppl["ppl"], 4), train_seconds=round(train_s, 1))
        if gsm_records:
            from ppa_hf.recipes.answers import extract_gsm8k, gsm8k_equal
            from ppa_hf.recipes.evaluation import build_prompts, generate, gold_of

            prompts = build_prompts("gsm8k", gsm_records, 4, gsm_shots)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                generations = generate(model, tok, prompts, args.eval_batch, args.gsm8k_max_new_tokens,
                                       progress=False)
            correct = [gsm8k_equal(extract_gsm8k(g), gold_of("gsm8k", r)) for g, r in zip(generations, gsm_records)]
            row["gsm8k_4shot_acc"] = round(sum(correct) / len(correct), 4)
            row["gsm8k_n"] = len(correct)
        row["seconds"] = round(time.time() - t0, 1)
        _append_csv(path, row)
        print(json.dumps(row), flush=True)
        model.to("cpu")
    plot_scurve(path, args.out_dir)
    return 0


def plot_scurve(path, out_dir):
    from ppa_hf.recipes.plots import plot_metric_vs_p

    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    for metric, label in [("passkey_acc", "passkey accuracy after fine-tune"), ("heldout_ppl", "held-out ppl"),
                          ("gsm8k_4shot_acc", "GSM8K 4-shot accuracy")]:
        if not rows or metric not in rows[0] or rows[0][metric] in ("", None):
            continue
        series = {}
        for r in rows:
            if r.get(metric) in ("", None):
                continue
            series.setdefault(f"{r['granularity']}, seed {r['seed']}", []).append((float(r["p"]), float(r[metric])))
        plot_metric_vs_p(os.path.join(out_dir, f"scurve_{metric}.png"), series, label,
                         f"SmolLM2-135M fine-tuned on passkey retrieval, context {rows[0]['context']}",
                         logy=metric == "heldout_ppl")


# ------------------------------------------------------------------------------------------------------ collect
def collect(args) -> int:
    """Rebuild zeroshot.csv / scurve.csv and their plots from run logs (one JSON object per result line)."""
    for log in args.logs:
        with open(log) as handle:
            for line in handle:
                if line.startswith("{"):
                    row = json.loads(line)
                    name = "scurve.csv" if "task" in row else "zeroshot.csv"
                    _append_csv(os.path.join(args.out_dir, name), row)
    for name, plot in [("zeroshot.csv", plot_zeroshot), ("scurve.csv", plot_scurve)]:
        if os.path.exists(os.path.join(args.out_dir, name)):
            plot(os.path.join(args.out_dir, name), args.out_dir)
    return 0


# ---------------------------------------------------------------------------------------------------------- cli
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out-dir", required=True)
    common.add_argument("--ps", type=float, nargs="+", default=ZEROSHOT_PS)
    z = sub.add_parser("zeroshot", parents=[common])
    add_ppa_arguments(z, omit=("p", "sink_tokens", "granularity"))  # those three are swept
    z.add_argument("--texts", nargs="+", default=["pydoc", "stdlib"])
    z.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    z.add_argument("--sinks", type=int, nargs="+", default=[0, 4])
    z.add_argument("--granularities", nargs="+", default=[DEFAULTS["ppa_granularity"]], choices=GRANULARITIES)
    z.add_argument("--tokens", type=int, default=65536, help="tokens scored per setting")
    z.add_argument("--batch-size", type=int, default=1)
    z.set_defaults(func=zeroshot)
    s = sub.add_parser("scurve", parents=[common])
    add_ppa_arguments(s, omit=("p",))
    s.add_argument("--seeds", type=int, nargs="+", default=[0])
    s.add_argument("--knee", type=float, nargs="*", default=[])
    s.add_argument("--knee-seeds", type=int, nargs="*", default=[])
    s.add_argument("--context", type=int, default=2048)
    s.add_argument("--steps", type=int, default=120)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--eval-samples", type=int, default=100)
    s.add_argument("--eval-batch", type=int, default=50)
    s.add_argument("--ppl-windows", type=int, default=8)
    s.add_argument("--gsm8k-limit", type=int, default=0)
    s.add_argument("--gsm8k-max-new-tokens", type=int, default=192)
    s.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    s.set_defaults(func=scurve)
    c = sub.add_parser("collect", parents=[common], help="rebuild CSVs and plots from run logs")
    c.add_argument("logs", nargs="+")
    c.set_defaults(func=collect)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.ps = [check_p(p, "--ps") for p in args.ps]
        vars(args).update(ppa_settings(args))  # the PPA options this subcommand has, validated
        if args.command == "zeroshot":
            args.sinks = [check_int(n, "--sinks", 0) for n in args.sinks]
    except ValueError as err:
        parser.error(str(err))
    os.makedirs(args.out_dir, exist_ok=True)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
