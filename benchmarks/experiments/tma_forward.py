"""Would tensor-descriptor (TMA) loads make the block-sparse forward faster on Hopper?

The forward kernel of :mod:`ppa_hf.ops.triton.prefill` loads K and V tiles through pointers (``cp.async`` on Hopper).
``_fwd_kernel_tma`` below is the same kernel with K and V read through host-made tensor descriptors (the Hopper
TMA unit): the same tile lists, the same masks (:func:`~ppa_hf.ops.triton.prefill._partial_tile`), the same online
softmax. Timed on one shape (batch 1, 32 query / 8 KV heads, bf16, inputs laid out ``[B, L, H, D]`` underneath as
Transformers makes them) for dense causal (p = 1), block p = 0.75 and token p = 0.75, at head size 64 and 128,
against the production kernel (in its own configuration and in each of the TMA kernel's), SDPA flash and cuDNN,
over a few launch configurations; one JSON line per run and
``$OUT/tma_forward.jsonl``.

    python -m benchmarks.experiments.tma_forward                      # CUDA (compute capability 9+): timings
    TRITON_INTERPRET=1 python -m benchmarks.experiments.tma_forward   # CPU: the TMA kernel equals the production one
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

from ppa_hf.ops.triton import prefill as P
from ppa_hf.ops.triton.common import LOG2E, tl, triton
from ppa_hf.pattern import PPAPattern

from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _tma_tile(q, desc_k, desc_v, b, hk, k0, scale_log2, mask, m_i, l_i, acc,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """:func:`~ppa_hf.ops.triton.prefill._fwd_tile` with the key tile at ``k0`` read through descriptors (rows past
    the end read as zeros: the descriptor's bounds)."""
    k = desc_k.load([b, hk, k0, 0]).reshape(BLOCK_N, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    if MASKED:
        s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = desc_v.load([b, hk, k0, 0]).reshape(BLOCK_N, HEAD_DIM)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel_tma(Q, desc_k, desc_v, O, LSE, scale_log2, sqb, sqh, sqm, sob, soh, som,
                    H, G, q_len, kv_len, q_start, k_start, lse_stride,
                    FPTR, FIDX, PPTR, PIDX, PMID, TOK, tok_len, BLK, blk_len, block_size, sinks, max_distance, WF, WB,
                    n_words, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    GRAN_BLOCK: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_MD: tl.constexpr,
                    USE_WORDS: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_bh, b, h, hk, offs_m = P._query_program(H, G, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None].to(tl.int64) * sqm
                + offs_d[None, :], mask=offs_m[:, None] < q_len, other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qpos = q_start + offs_m
    kv_end = k_start + kv_len
    for it in range(tl.load(FPTR + pid_m), tl.load(FPTR + pid_m + 1)):
        k0 = tl.load(FIDX + it) * BLOCK_N
        m_i, l_i, acc = _tma_tile(q, desc_k, desc_v, b, hk, k0, scale_log2, None, m_i, l_i, acc, BLOCK_N, HEAD_DIM,
                                  False, PRECISION)
    start = tl.load(PPTR + pid_m)
    end = tl.load(PPTR + pid_m + 1)
    if USE_WORDS:
        mid = tl.load(PMID + pid_m)
        for it in range(start, mid):
            cols, mask = P._partial_tile(it, PIDX, qpos, offs_n, k_start, kv_end, TOK, tok_len, WF, n_words, BLK,
                                         blk_len, block_size, sinks, max_distance, BLOCK_N, GRAN_BLOCK, HAS_SINKS,
                                         HAS_MD, True, True)
            m_i, l_i, acc = _tma_tile(q, desc_k, desc_v, b, hk, tl.load(PIDX + it) * BLOCK_N, scale_log2, mask,
                                      m_i, l_i, acc, BLOCK_N, HEAD_DIM, True, PRECISION)
        start = mid
    for it in range(start, end):
        cols, mask = P._partial_tile(it, PIDX, qpos, offs_n, k_start, kv_end, TOK, tok_len, WF, n_words, BLK,
                                     blk_len, block_size, sinks, max_distance, BLOCK_N, GRAN_BLOCK, HAS_SINKS, HAS_MD,
                                     USE_WORDS, False)
        m_i, l_i, acc = _tma_tile(q, desc_k, desc_v, b, hk, tl.load(PIDX + it) * BLOCK_N, scale_log2, mask,
                                  m_i, l_i, acc, BLOCK_N, HEAD_DIM, True, PRECISION)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + pid_bh.to(tl.int64) * lse_stride + offs_m, lse)
    tl.store(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None].to(tl.int64) * som + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=offs_m[:, None] < q_len)


def tma_forward(q, k, v, pattern, cfg):
    """A closure running ``_fwd_kernel_tma`` on ``q [B, H, L, D]``, ``k``/``v [B, Hkv, L, D]`` with launch
    configuration ``cfg = (BLOCK_M, BLOCK_N, warps, stages)``; returns ``o``."""
    bm, bn, warps, stages = cfg
    ctx = P._Ctx(pattern, q, k, 0, 0, None)
    B, H, L, D = q.shape
    o = torch.empty_like(q)
    lse = torch.full((B, H, P._lse_len(q)), float("inf"), device=q.device, dtype=torch.float32)
    lists = ctx.lists(bm, bn)
    desc_k, desc_v = (TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, bn, D]) for x in (k, v))
    scale = 1 / math.sqrt(D)

    def run():
        _fwd_kernel_tma[(triton.cdiv(L, bm), B * H)](
            q, desc_k, desc_v, o, lse, scale * LOG2E, q.stride(0), q.stride(1), q.stride(2),
            o.stride(0), o.stride(1), o.stride(2), ctx.H, ctx.G, L, L, 0, 0, lse.shape[-1], *lists,
            *ctx.pattern_args(), HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
            USE_WORDS=ctx.use_words(bn), **ctx.flags)
        return o

    return run


def production_forward(q, k, v, pattern, cfg):
    """The production forward (:func:`ppa_hf.ops.triton.prefill._forward`) with launch configuration ``cfg``."""
    ctx = P._Ctx(pattern, q, k, 0, 0, None)
    ctx.fwd_cfg = cfg
    scale = 1 / math.sqrt(q.shape[-1])
    return lambda: P._forward(ctx, q, k, v, scale)[0]


def inputs(L, D, device, dtype):
    """``q [1, 32, L, D]``, ``k``, ``v [1, 8, L, D]``, each a transposed view of ``[1, L, heads, D]``."""
    return [torch.randn(1, L, h, D, device=device, dtype=dtype).transpose(1, 2) for h in (32, 8, 8)]


PATTERNS = {"dense": PPAPattern(1.0, 64), "block_0.75": PPAPattern(0.75, 64, 0, "block", 128),
            "token_0.75": PPAPattern(0.75, 64)}


def main():
    if not torch.cuda.is_available():  # the interpreter: the TMA kernel against the production one
        torch.manual_seed(0)
        for L, name in [(200, "token_0.75"), (333, "block_0.75"), (130, "dense")]:
            pattern = PPAPattern(PATTERNS[name].p, 8, 0, PATTERNS[name].granularity, 16)
            q, k, v = inputs(L, 16, "cpu", torch.float32)
            cfg = (16, 16, 4, 1)
            ref = production_forward(q, k, v, pattern, cfg)()
            out = tma_forward(q, k, v, pattern, cfg)()
            err = float((out - ref).abs().max())
            print(json.dumps(dict(L=L, pattern=name, max_abs_diff_vs_production=err)))
            assert err < 1e-5, err
        return
    from triton.testing import do_bench

    from benchmarks.run import machine

    out_dir = os.environ.get("OUT", ".")
    L = int(os.environ.get("TMA_L", 32768))
    rows = []
    info = machine()
    for D in (64, 128):
        q, k, v = inputs(L, D, "cuda", torch.bfloat16)
        base = {}
        for name, backend in (("flash", torch.nn.attention.SDPBackend.FLASH_ATTENTION),
                              ("cudnn", torch.nn.attention.SDPBackend.CUDNN_ATTENTION)):
            with torch.nn.attention.sdpa_kernel(backend):
                sdpa = torch.nn.functional.scaled_dot_product_attention
                base[name] = do_bench(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True), warmup=25, rep=100)
        default = P.configs(D, torch.bfloat16, "cuda")[0]
        bm = default[0]
        grid = [default] + [(bm, bn, w, s) for bn in (64, 128) for w in (4, 8) for s in (2, 3)
                            if (bm, bn, w, s) != default]
        for name, pattern in PATTERNS.items():
            ref = production_forward(q, k, v, pattern, default)().clone()
            prod_ms = do_bench(production_forward(q, k, v, pattern, default), warmup=25, rep=100)
            for cfg in grid:
                if pattern.granularity == "token" and pattern.p < 1 and cfg[1] > 64:
                    continue  # the word masks need BLOCK_N <= 64
                row = dict(info, head_dim=D, L=L, pattern=name, cfg=str(cfg), flash_ms=base["flash"],
                           cudnn_ms=base["cudnn"], production_ms=prod_ms, production_cfg=str(default))
                for kind, make in (("tma", tma_forward), ("pointer", production_forward)):
                    try:  # the production kernel in this configuration too: what TMA adds beyond the launch
                        run = make(q, k, v, pattern, cfg)
                        row[f"{kind}_max_abs_diff"] = float((run() - ref).abs().max())
                        row[f"{kind}_ms"] = do_bench(run, warmup=25, rep=100)
                    except Exception as e:  # a configuration that does not compile (shared memory) is recorded
                        row[f"{kind}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                if "tma_ms" in row:
                    row["tma_vs_production"] = prod_ms / row["tma_ms"]
                    row["tma_vs_cudnn"] = base["cudnn"] / row["tma_ms"]
                print(json.dumps(row), flush=True)
                rows.append(row)
    with open(os.path.join(out_dir, "tma_forward.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    sys.exit(main())
