"""Same-run timing of the Triton PPA kernels before (3f0cc7d) and after (16a07d1) the fwd/dQ tile functions.

On the GPU machine, from the repo root, with the previous kernel file copied beside the current one:
    cp .dev/triton_attention_before.py ppa_hf/ops/triton_attention_before.py
    python3 docs/bench_results/tile_helpers/compare.py
Shape as docs/benchmarks.md: batch 1, 32 query heads, 8 KV heads, head dim 128, bf16, window 64, p = 0.75.
Medians of triton.testing.do_bench; inputs built outside the timed region; both versions timed in one process.
"""
import torch
from triton.testing import do_bench

from ppa_hf.ops import triton_attention as after
from ppa_hf.ops import triton_attention_before as before
from ppa_hf.pattern import PPAPattern

for granularity in ("token", "block"):
    pattern = PPAPattern(0.75, window=64, granularity=granularity, block_size=128)
    for length in (8192, 32768):
        q = torch.randn(1, 32, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)
        row = {}
        for name, mod in (("before", before), ("after", after)):
            out = mod.triton_ppa_attention(q, k, v, pattern)
            row[name + "_fwd_ms"] = do_bench(lambda: mod.triton_ppa_attention(q, k, v, pattern))
            row[name + "_fwdbwd_ms"] = do_bench(
                lambda: torch.autograd.grad(mod.triton_ppa_attention(q, k, v, pattern), (q, k, v), do))
            row[name + "_out"] = out
        same = torch.equal(row.pop("before_out"), row.pop("after_out"))
        print(granularity, length, {k: round(v, 3) for k, v in row.items()}, "outputs bitwise equal:", same,
              flush=True)
