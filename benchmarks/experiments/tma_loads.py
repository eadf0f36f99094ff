"""Tensor-descriptor (TMA) loads against pointer loads in the prefill kernels, on the GPU.

The forward, dK/dV and dQ kernels read their streamed tiles (K and V; Q and dO) either through pointers
(``PPA_TRITON_TMA=0``) or through tensor descriptors (``PPA_TRITON_TMA=1``; Hopper's copy engine). One shape
(batch 1, 32 query / 8 KV heads by default, bf16, inputs laid out ``[B, L, H, D]`` underneath as Transformers makes
them), head size 64 and 128, dense causal (p = 1), block p = 0.75 and token p = 0.75:

* ``fwd``: the forward in a few launch configurations (``PPA_TRITON_FWD``), both loads;
* ``fwdbwd``: forward + backward in the default configurations, both loads;

with SDPA flash and cuDNN in the same run. One JSON line per row, and ``$OUT/tma_loads.jsonl``.

    python -m benchmarks.experiments.tma_loads
    TRITON_INTERPRET=1 python -m benchmarks.experiments.tma_loads --device cpu --length 64 --head-dims 16  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
from unittest import mock

import torch

from benchmarks import run as bench
from ppa_hf.ops.triton import prefill, triton_ppa_attention
from ppa_hf.pattern import PPAPattern

PATTERNS = {"dense": PPAPattern(1.0, 64), "block_0.75": PPAPattern(0.75, 64, 0, "block", 128),
            "token_0.75": PPAPattern(0.75, 64)}


def with_env(values: dict, fn):
    """``fn``, to be called with the environment variables ``values`` set (the kernels read them in every call)."""
    return mock.patch.dict(os.environ, values)(fn)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("QUERY", "KV"))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 (float32, no SDPA "
                    "baselines, the interpreter's launch configuration)")
    args = ap.parse_args(argv)
    out_dir = os.environ.get("OUT", ".")
    L, dev = args.length, args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    info = bench.machine()
    rows = []

    def emit(row):
        row = dict(info, L=L, **row)
        print(json.dumps(row), flush=True)
        rows.append(row)

    for D in args.head_dims:
        q, k, v = (torch.randn(1, L, h, D, device=dev, dtype=dtype).transpose(1, 2).requires_grad_()
                   for h in (args.heads[0], args.heads[1], args.heads[1]))
        do = torch.randn_like(q)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for name, backend in (("flash", torch.nn.attention.SDPBackend.FLASH_ATTENTION),
                              ("cudnn", torch.nn.attention.SDPBackend.CUDNN_ATTENTION))[:2 if dev == "cuda" else 0]:
            with torch.nn.attention.sdpa_kernel(backend):
                with torch.no_grad():
                    fwd = bench.kernel_ms(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True))[0]
                both = bench.kernel_ms(lambda: torch.autograd.grad(sdpa(q, k, v, is_causal=True, enable_gqa=True),
                                                             (q, k, v), do))[0]
            emit(dict(head_dim=D, impl=name, pattern="dense", fwd_ms=fwd, fwdbwd_ms=both))
        bm = prefill.configs(D, dtype, dev)[0][0]
        grid = [(bm, 64, 4, 3), (bm, 64, 8, 3), (bm, 64, 4, 2), (bm, 64, 8, 2), (bm, 128, 8, 2)]
        grid = grid if dev == "cuda" else []  # (the interpreter runs one configuration of its own)
        for pname, pattern in PATTERNS.items():
            call = lambda: triton_ppa_attention(q, k, v, pattern)  # noqa: E731
            for tma in ("0", "1"):
                default = with_env({"PPA_TRITON_TMA": tma}, lambda: prefill.configs(D, dtype, dev)[0])()
                with torch.no_grad():
                    ref = with_env({"PPA_TRITON_TMA": "0"}, call)()
                    got = with_env({"PPA_TRITON_TMA": tma}, call)()
                diff = float((got - ref).abs().max())
                both = bench.kernel_ms(with_env({"PPA_TRITON_TMA": tma},
                                                lambda: torch.autograd.grad(call(), (q, k, v), do)))[0]
                with torch.no_grad():
                    fwd = bench.kernel_ms(with_env({"PPA_TRITON_TMA": tma}, call))[0]
                emit(dict(head_dim=D, impl="triton", pattern=pname, tma=int(tma), cfg=str(default), fwd_ms=fwd,
                          fwdbwd_ms=both, max_abs_diff_vs_pointer=diff))
                for cfg in (c for c in grid if c != default):
                    if pattern.granularity == "token" and pattern.p < 1 and cfg[1] > 64:
                        continue  # the word masks need BLOCK_N <= 64
                    env = {"PPA_TRITON_TMA": tma, "PPA_TRITON_FWD": ",".join(map(str, cfg))}
                    try:
                        with torch.no_grad():
                            fwd = bench.kernel_ms(with_env(env, call))[0]
                        emit(dict(head_dim=D, impl="triton", pattern=pname, tma=int(tma), cfg=str(cfg), fwd_ms=fwd))
                    except Exception as e:  # a configuration that does not fit (shared memory) is recorded
                        emit(dict(head_dim=D, impl="triton", pattern=pname, tma=int(tma), cfg=str(cfg),
                                  error=f"{type(e).__name__}: {str(e)[:160]}"))
    with open(os.path.join(out_dir, "tma_loads.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
