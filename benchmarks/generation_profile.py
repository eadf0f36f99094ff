"""Where the time of batched, left-padded generation and of padded training steps goes (one GPU).

A randomly initialised model of SmolLM2-135M's shape (Llama, 30 layers, hidden 576, 9 heads, 3 KV heads) runs
  * generate: 4 batches of left-padded prompts of 4 different lengths, greedy, sdpa vs PPA (auto, naive);
    wall time per batch (the first batches include compilation), then the steady per-token time;
  * train: fwd+bwd steps under bf16 autocast on right-padded batches of varying length, sdpa vs PPA auto;
and counts which PPA backend served each attention call. Prints one JSON line per measurement.

    python benchmarks/generation_profile.py --out results.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import ppa_hf  # noqa: E402
import ppa_hf.hf.dispatch as attention  # noqa: E402

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
USED = collections.Counter()


def _count_backends():
    real = attention.choose_path

    def counting(*args, **kwargs):
        name = real(*args, **kwargs)
        USED[name] += 1
        return name

    attention.choose_path = counting


def _emit(out, **row):
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as handle:
            handle.write(line + "\n")


def _sync_time(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def generate_runs(model, args, label):
    g = torch.Generator().manual_seed(0)
    for i, length in enumerate(args.prompt_lengths):
        ids = torch.randint(3, 49152, (args.batch, length), generator=g).cuda()
        mask = torch.ones_like(ids)
        for b in range(args.batch):  # left padding: 0..~20% of the prompt
            mask[b, : (b * length) // (5 * args.batch)] = 0
        ids = ids.masked_fill(mask == 0, 0)
        USED.clear()
        with torch.no_grad():
            prefill_s, _ = _sync_time(lambda: model(ids, attention_mask=mask, use_cache=False))
            total_s, _ = _sync_time(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                                           min_new_tokens=args.new_tokens, do_sample=False))
        yield dict(kind="generate", attn=label, batch=i, prompt=length, B=args.batch, new_tokens=args.new_tokens,
                   prefill_s=round(prefill_s, 3), generate_s=round(total_s, 3),
                   decode_ms_per_token=round(1000 * max(total_s - prefill_s, 0.0) / args.new_tokens, 2),
                   backends=dict(USED))


def train_runs(model, args, label):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    g = torch.Generator().manual_seed(1)
    for i, length in enumerate(args.train_lengths):
        ids = torch.randint(3, 49152, (args.train_batch, length), generator=g).cuda()
        mask = torch.ones_like(ids)
        for b in range(args.train_batch):  # right padding
            mask[b, length - (b * length) // (4 * args.train_batch):] = 0
        USED.clear()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        seconds, loss = _sync_time(step)
        yield dict(kind="train", attn=label, step=i, length=length, B=args.train_batch, step_s=round(seconds, 3),
                   tokens_per_s=round(int(mask.sum()) / seconds, 1), loss=round(loss, 4), backends=dict(USED))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--p", type=float, default=0.75)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[700, 820, 940, 1000])
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-lengths", type=int, nargs="+",
                        default=[269, 275, 301, 288, 310, 333, 297, 281, 350, 322, 305, 290])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attns", nargs="+", default=["sdpa", "ppa-auto", "ppa-sdpa_mask"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    _count_backends()
    _emit(args.out, kind="machine", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
          transformers=__import__("transformers").__version__, dtype=args.dtype, p=args.p)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).cuda().to(getattr(torch, args.dtype))
    for label in args.attns:
        if label == "sdpa":
            model.set_attn_implementation("sdpa")
        else:
            ppa_hf.apply(model, p=args.p, backend=label.split("-", 1)[1])
        model.eval()
        for row in generate_runs(model, args, label):
            _emit(args.out, **row)
        if args.dtype == "float32" and label != "ppa-sdpa_mask":
            model.train()
            for row in train_runs(model, args, label):
                _emit(args.out, **row)
            model.eval()


if __name__ == "__main__":
    main()
