"""The prefill backward with dQ added up inside the dK/dV kernel against its two-kernel form, on the GPU.

``split`` (``PPA_TRITON_BWD=split``): a dK/dV kernel per key tile and a dQ kernel per query tile, which computes the
scores and probabilities again (seven matmuls per pair of tiles). ``fused`` (``PPA_TRITON_BWD=fused``): the dK/dV
kernel also adds each pair's ``dS @ K`` to a float32 dQ buffer with atomic adds (five matmuls), through pointers
(``PPA_TRITON_TMA=0``) or Hopper's bulk tensor reduction (``PPA_TRITON_TMA=1``, which also reads Q and dO through
descriptors). One shape (batch 1, 32 query / 8 KV heads by default, bf16, inputs laid out ``[B, L, H, D]`` underneath
as Transformers makes them), head size 64 and 128, dense causal (p = 1), block p = 0.75 and token p = 0.75: the
backward alone (the custom op, from saved outputs) and forward + backward, the fused form in several dK/dV launch
configurations (``PPA_TRITON_DKDV``), with each form's largest difference from the split form's gradients and
SDPA flash and cuDNN in the same run. One JSON line per row, and ``$OUT/fused_dq.jsonl``.

    python -m benchmarks.experiments.fused_dq
    TRITON_INTERPRET=1 python -m benchmarks.experiments.fused_dq --device cpu --length 64 --head-dims 16  # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from benchmarks import run as bench
from benchmarks.experiments.tma_loads import PATTERNS, with_env
from ppa_hf.ops.triton import prefill, triton_ppa_attention

CONFIGS = [(64, 64, 4, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 4, 2)]


def _untimed(fn):
    """The smoke run's stand-in for :func:`benchmarks.run.kernel_ms`: runs ``fn`` once, times nothing."""
    fn()
    return (float("nan"),) * 3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("QUERY", "KV"))
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 (float32, no SDPA "
                    "baselines, the interpreter's launch configuration)")
    args = ap.parse_args(argv)
    out_dir = os.environ.get("OUT", ".")
    L, dev = args.length, args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    timed = bench.kernel_ms if dev == "cuda" else _untimed
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
                o = sdpa(q, k, v, is_causal=True, enable_gqa=True)
                bwd = timed(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))[0]
                both = timed(lambda: torch.autograd.grad(sdpa(q, k, v, is_causal=True, enable_gqa=True),
                                                        (q, k, v), do))[0]
            emit(dict(head_dim=D, impl=name, pattern="dense", bwd_ms=bwd, fwdbwd_ms=both))
        default_dkdv = prefill.configs(D, dtype, dev)[1]
        scale = 1.0 / math.sqrt(D)
        for pname in args.patterns:
            pattern = PATTERNS[pname]
            p, window, sinks, gran, block = pattern._key
            key = [p, window, sinks, block]
            with torch.no_grad():
                o, lse = prefill._prefill_forward(q, k, v, key, gran, 0, 0, None, scale)
            backward = lambda: prefill._prefill_backward(q, k, v, o, lse, do, key, gran, 0, 0, None, scale)  # noqa
            both = lambda: torch.autograd.grad(triton_ppa_attention(q, k, v, pattern), (q, k, v), do)  # noqa: E731
            split = None
            for mode, tma, cfg in ([("split", t, default_dkdv) for t in ("0", "1")]
                                   + [("fused", t, c) for t in ("0", "1")
                                      for c in ([default_dkdv] + [c for c in CONFIGS if c != default_dkdv]
                                                if dev == "cuda" else [default_dkdv])]):
                env = {"PPA_TRITON_BWD": mode, "PPA_TRITON_TMA": tma, "PPA_TRITON_DKDV": ",".join(map(str, cfg))}
                row = dict(head_dim=D, impl="triton", pattern=pname, bwd=mode, tma=int(tma), dkdv_cfg=str(cfg))
                try:
                    grads = with_env(env, backward)()
                    if split is None:
                        split = grads
                    row["max_abs_diff_vs_split"] = max(float((a - b).abs().max()) for a, b in zip(grads, split))
                    row["bwd_ms"] = timed(with_env(env, backward))[0]
                    if cfg == default_dkdv:
                        row["fwdbwd_ms"] = timed(with_env(env, both))[0]
                except Exception as e:  # a configuration that does not fit (shared memory, registers) is recorded
                    row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                emit(row)
            del o, lse
    with open(os.path.join(out_dir, "fused_dq.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
