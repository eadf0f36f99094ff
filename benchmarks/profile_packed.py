"""Where the time of the unpacked Triton path goes on a packed row (GPU).

For one row of ``L`` tokens packed with ``--docs`` sequences of equal length (32 query / 8 KV heads, bf16, p = 0.75),
token and block granularity: forward and forward + backward of ``triton_layout_attention`` (the sequences unpacked
one per row inside the op), of the same kernels on the sequences already in rows (``[docs, H, L / docs, D]``: what
the unpacking costs is the difference), and of FlexAttention with the layout's BlockMask; the host plan alone
(``_plan``) and one copy of q into rows (``to_rows``). Medians in ms (:func:`benchmarks.run.kernel_ms`). With
``--profile``, a torch.profiler table (CPU and CUDA) of one forward + backward of the unpacked path per case.

    python benchmarks/profile_packed.py --head-dims 64 --docs 4 --profile
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import run as bench  # noqa: E402
from benchmarks.run import packed_layout  # noqa: E402
from ppa_hf.ops.flex import flex_attention_ppa, layout_block_mask  # noqa: E402
from ppa_hf.ops.triton import triton_layout_attention, triton_ppa_attention  # noqa: E402
from ppa_hf.ops.triton.packed import _plan  # noqa: E402
from ppa_hf.pattern import PPAPattern  # noqa: E402


def ms(fn) -> float:
    """Median ms of ``fn`` (:func:`benchmarks.run.kernel_ms`, looked up at call time so a smoke test can stand in)."""
    return bench.kernel_ms(fn)[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64])
    ap.add_argument("--docs", type=int, nargs="+", default=[4])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 with a stand-in for "
                    "the GPU timer (no Flex: it has no backward on a CPU)")
    args = ap.parse_args(argv)
    L, dev = args.length, args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    for D in args.head_dims:
        for docs in args.docs:
            layout, _ = packed_layout(L, docs, dev)
            q, k, v = (torch.randn(1, h, L, D, device=dev, dtype=dtype, requires_grad=True) for h in (32, 8, 8))
            do = torch.randn_like(q)
            n = L // docs  # (equal lengths when docs divides L)
            rq, rk, rv = (torch.randn(docs, h, n, D, device=dev, dtype=dtype, requires_grad=True)
                          for h in (32, 8, 8))
            rdo = torch.randn_like(rq)
            for gran in ("token", "block"):
                pattern = PPAPattern(0.75, 64, 0, gran, 128)
                calls = {
                    "unpacked": (lambda: triton_layout_attention(q, k, v, layout, pattern), (q, k, v), do),
                    "rows": (lambda: triton_ppa_attention(rq, rk, rv, pattern), (rq, rk, rv), rdo),
                }
                if dev == "cuda":
                    block_mask = layout_block_mask(layout, pattern)
                    calls["flex"] = (lambda: flex_attention_ppa(q, k, v, block_mask), (q, k, v), do)
                row = {}
                for name, (fn, inputs, grad) in calls.items():
                    with torch.no_grad():
                        row[f"fwd_{name}"] = ms(fn)
                    torch.autograd.grad(fn(), inputs, grad)  # first call outside the timing
                    row[f"fwdbwd_{name}"] = ms(lambda: torch.autograd.grad(fn(), inputs, grad))
                row["plan"] = ms(lambda: _plan(layout.seg, layout.pos, layout.q_index))
                plan = _plan(layout.seg, layout.pos, layout.q_index)[1]
                row["to_rows_q"] = ms(lambda: plan.to_rows(q, queries=True))
                timings = " ".join(f"{key}={value:.3f}" for key, value in row.items())
                print(f"D={D} L={L} docs={docs} {gran}: {timings}", flush=True)
                if args.profile:
                    from torch.profiler import ProfilerActivity, profile

                    fn, inputs, grad = calls["unpacked"]
                    cuda = dev == "cuda"
                    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                    with profile(activities=activities) as prof:
                        torch.autograd.grad(fn(), inputs, grad)
                        if cuda:
                            torch.cuda.synchronize()
                    order = "self_cuda_time_total" if cuda else "self_cpu_time_total"
                    print(prof.key_averages().table(sort_by=order, row_limit=25), flush=True)


if __name__ == "__main__":
    main()
