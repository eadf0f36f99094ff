"""Host time of one decoding step's attention calls, sdpa (as Transformers runs it, and with cuDNN excluded) against
PPA (token and block, p = 0.75): the 1B-shaped model of benchmarks/run.py, 8 layers, dynamic cache, 32k context,
batch 1 and 8. The registered attention functions are wrapped with a ``time.perf_counter`` timer (host time of the
call, no synchronisation); each step is synchronised. One JSON line per (batch, implementation) with the step's
time, its host time, the first step after the prefill, and the attention call's host time in the first layer
(where PPA builds its index lists) and in the others (median over 29 steps); plus a torch.profiler table of PPA
token steps at batch 1. Needs a CUDA GPU.

    python benchmarks/decode_host.py    # writes $OUT/decode_host.jsonl and $OUT/decode_profile_token.txt
"""
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from benchmarks.run import VOCAB, make_model, sdpa_backends, use_impl  # noqa: E402
from ppa_hf.hf.dispatch import ppa_attention_forward  # noqa: E402

OUT = os.environ.get("OUT", ".")
HOST = collections.defaultdict(list)


def timed(name, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        r = fn(*a, **k)
        HOST[name].append(time.perf_counter() - t0)
        return r
    return wrapper


def emit(**row):
    print(json.dumps(row), flush=True)
    with open(os.path.join(OUT, "decode_host.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def main():
    model = make_model("llama-1b", 8, 40000).eval()
    AttentionInterface.register("sdpa", timed("sdpa", sdpa_attention_forward))
    AttentionInterface.register("ppa", timed("ppa", ppa_attention_forward))
    for batch in (1, 8):
        ids = torch.randint(3, VOCAB, (batch, 32768), device="cuda")
        for impl, gran in (("sdpa", None), ("sdpa_flash", None), ("ppa", "token"), ("ppa", "block")):
            use_impl(model, impl, gran, 0.75)
            key = "ppa" if impl == "ppa" else "sdpa"
            with torch.no_grad(), sdpa_backends(impl):
                cache = DynamicCache(config=model.config)
                mask = torch.ones(batch, 32768 + 64, dtype=torch.long, device="cuda")
                tok = model(ids, attention_mask=mask[:, :32768], past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
                torch.cuda.synchronize()
                full, host, first, first_layer, other_layers = [], [], None, [], []
                for i in range(30):
                    HOST.clear()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = model(tok, attention_mask=mask[:, :32769 + i], past_key_values=cache)
                    t1 = time.perf_counter()
                    tok = out.logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    if i == 0:
                        first = (t2 - t0) * 1e3
                        continue
                    full.append((t2 - t0) * 1e3); host.append((t1 - t0) * 1e3)
                    calls = HOST[key]
                    first_layer.append(calls[0] * 1e6); other_layers.append(sum(calls[1:]) / (len(calls) - 1) * 1e6)
                full.sort(); host.sort()
                emit(part="decode", batch=batch, impl=impl, gran=gran, step_ms=full[len(full)//2],
                     host_ms=host[len(host)//2], first_ms=first,
                     attn_host_us_layer0=sorted(first_layer)[len(first_layer)//2],
                     attn_host_us_other_layers=sorted(other_layers)[len(other_layers)//2])
                if batch == 1 and impl == "ppa" and gran == "token":
                    from torch.profiler import profile, ProfilerActivity
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for i in range(5):
                            out = model(tok, attention_mask=mask[:, :32769 + 30 + i], past_key_values=cache)
                            tok = out.logits[:, -1:].argmax(-1)
                        torch.cuda.synchronize()
                    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
                    print(table)
                    open(os.path.join(OUT, f"decode_profile_{gran}.txt"), "w").write(table)
            del cache
            torch.cuda.empty_cache()
    AttentionInterface.register("sdpa", sdpa_attention_forward)
    AttentionInterface.register("ppa", ppa_attention_forward)
    del model
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
