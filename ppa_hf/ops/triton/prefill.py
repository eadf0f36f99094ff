"""Triton block-sparse PPA attention for training and prefill: forward and backward.

A FlashAttention-style kernel walks, for each query tile, the list of key tiles that
:func:`~ppa_hf.ops.tiles.tile_classes` derives from the pattern's tables: first the FULL tiles (dense, no
per-element mask), then the PARTIAL ones (:func:`~ppa_hf.ops.triton.common.tile_mask` per element); EMPTY tiles are
never touched. The backward pass runs two kernels: dK/dV per key tile over the transposed list (the query heads of
one KV group looped inside, so GQA needs neither repeated K/V nor atomics), and dQ per query tile. One unpadded
sequence per batch row (or right padding), any length. The tiles a kernel streams (K and V; Q and dO in dK/dV) are
read through pointers or, on GPUs with Hopper's TMA copy engine, through tensor descriptors
(:func:`~ppa_hf.ops.triton.common.tma_wanted`).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from ...pattern import PPAPattern
from ..tiles import device_lists
from .common import (LOG2E, descriptor, dot_precision, env_config, interpreted, last_contiguous, pattern_tables,
                     run_fitting, tile_mask, tl, tma_ready, tma_wanted, triton, unsupported_reason, word_mask,
                     word_tables)


def configs(head_dim: int, dtype: torch.dtype, device):
    """``(fwd, dkdv, dq)`` launch configurations ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``, measured per head size
    on an H200 (``python -m benchmarks.run tune``; benchmarks/results/tune.csv), the forward through descriptors on
    an H100 (``python -m benchmarks.experiments.tma_loads``); overridable for tuning with
    ``PPA_TRITON_FWD="BM,BN,warps,stages"``, ``PPA_TRITON_DKDV``, ``PPA_TRITON_DQ``. The word masks need
    ``BLOCK_N <= 64`` (forward, dQ) and ``BLOCK_M <= 64`` (dK/dV)."""
    if interpreted(device):
        small = (16, 16, 4, 1)
        return small, small, small
    if head_dim > 128 or dtype == torch.float32:
        default = (64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2)
    elif head_dim <= 64:  # 4 warps: 8-13% faster than 8 at head size 64 (token and block patterns)
        default = (128, 64, 4, 3), (64, 64, 4, 2), (128, 64, 4, 3)
    else:
        default = (128, 64, 8, 3), (64, 128, 8, 2), (64, 64, 4, 2)
    if dtype != torch.float32 and tma_wanted(device, head_dim, "forward") and head_dim <= 128:
        # the forward through descriptors (H100, tma_loads): 4 warps and 2 stages the fastest of those tried for
        # dense, block and token patterns at head size 64 (within 1%) and for dense and block at 128 (token: 2%
        # behind 8 warps)
        default = ((128, 64, 4, 2),) + default[1:]
    return tuple(env_config(name, cfg) for name, cfg in zip(("PPA_TRITON_FWD", "PPA_TRITON_DKDV", "PPA_TRITON_DQ"),
                                                             default))


if triton is not None:

    @triton.jit
    def _query_program(H, G, BLOCK_M: tl.constexpr):
        """A query-tile program's (tile, batch*head, batch, head, KV head) and its query rows ``[BLOCK_M]``."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        return pid_m, pid_bh, b, h, h // G, pid_m * BLOCK_M + tl.arange(0, BLOCK_M)

    @triton.jit
    def _partial_tile(it, PIDX, qpos, offs_n, k_start, kv_end, TOK, tok_len, WF, n_words, BLK, blk_len, block_size,
                      sinks, max_distance, BLOCK_N: tl.constexpr, GRAN_BLOCK: tl.constexpr, HAS_SINKS: tl.constexpr,
                      HAS_MD: tl.constexpr, USE_WORDS: tl.constexpr, TOKEN_ONLY: tl.constexpr):
        """First key column and ``[BLOCK_M, BLOCK_N]`` mask of a query tile's ``it``-th partial tile: a
        TOKEN_PARTIAL tile (``TOKEN_ONLY``) from the token table's words alone, any other from the whole predicate."""
        k0 = tl.load(PIDX + it) * BLOCK_N
        cols = k0 + offs_n
        if TOKEN_ONLY:
            mask = word_mask(WF, n_words, qpos - (k_start + k0), BLOCK_N)
        else:
            mask = tile_mask(qpos, k_start + cols, kv_end, TOK, tok_len, WF, n_words, BLK, blk_len, block_size, sinks,
                             max_distance, BLOCK_N, False, GRAN_BLOCK, HAS_SINKS, HAS_MD, USE_WORDS)
        return k0, mask

    @triton.jit
    def _rows_tile(ptr, desc, b, h, r0, rows, offs_d, stride, n_rows, TRANSPOSED: tl.constexpr,
                   BOUNDED: tl.constexpr, TMA: tl.constexpr):
        """Rows ``r0 .. r0 + len(rows)`` (``rows``) of one head of a ``[B, heads, N, HEAD_DIM]`` tensor:
        ``[len(rows), HEAD_DIM]``, or its transpose when ``TRANSPOSED``. ``TMA``: through the tensor descriptor
        ``desc`` (Hopper's copy engine; rows past the end read as zeros), else through ``ptr`` (the head's base)
        with rows past ``n_rows`` read as zeros when ``BOUNDED`` (unbounded loads pipeline better)."""
        if TMA:
            x = desc.load([b, h, r0, 0])
            x = x.reshape(x.shape[2], x.shape[3])
            if TRANSPOSED:
                x = tl.trans(x)
        elif TRANSPOSED:
            at = ptr + rows[None, :].to(tl.int64) * stride + offs_d[:, None]
            if BOUNDED:
                x = tl.load(at, mask=(rows < n_rows)[None, :], other=0.0)
            else:
                x = tl.load(at)
        else:
            at = ptr + rows[:, None].to(tl.int64) * stride + offs_d[None, :]
            if BOUNDED:
                x = tl.load(at, mask=(rows < n_rows)[:, None], other=0.0)
            else:
                x = tl.load(at)
        return x

    @triton.jit
    def _fwd_tile(q, k_ptr, v_ptr, KD, VD, b, hk, k0, offs_n, offs_d, skn, svn, kv_len, scale_log2, mask, m_i, l_i,
                  acc, MASKED: tl.constexpr, BOUNDED: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
        """One key tile (columns ``k0 + offs_n``) of the forward's online softmax for the ``[BLOCK_M]`` queries of
        ``q``; ``MASKED``: a partial tile (``mask`` applies), else a full tile; ``BOUNDED``, ``TMA``: as in
        :func:`_rows_tile` (``KD``/``VD``: the descriptors of K and V). Returns the new running max, denominator
        and ``[BLOCK_M, HEAD_DIM]`` accumulator."""
        cols = k0 + offs_n
        k = _rows_tile(k_ptr, KD, b, hk, k0, cols, offs_d, skn, kv_len, True, BOUNDED, TMA)
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2
        if MASKED:
            s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _rows_tile(v_ptr, VD, b, hk, k0, cols, offs_d, svn, kv_len, False, BOUNDED, TMA)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _dq_tile(q, do, lse, delta, k_ptr, v_ptr, KD, VD, b, hk, k0, offs_n, offs_d, skn, svn, kv_len, scale_log2,
                 mask, dq, MASKED: tl.constexpr, BOUNDED: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
        """One key tile's contribution to ``dq [BLOCK_M, HEAD_DIM]`` (``MASKED``, ``BOUNDED``, ``TMA`` as in
        :func:`_fwd_tile`)."""
        cols = k0 + offs_n
        kT = _rows_tile(k_ptr, KD, b, hk, k0, cols, offs_d, skn, kv_len, True, BOUNDED, TMA)
        vT = _rows_tile(v_ptr, VD, b, hk, k0, cols, offs_d, svn, kv_len, True, BOUNDED, TMA)
        p = tl.exp2(tl.dot(q, kT, input_precision=PRECISION) * scale_log2 - lse[:, None])
        if MASKED:
            p = tl.where(mask, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        return tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, scale_log2,
                    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                    H, G, q_len, kv_len, q_start, k_start, lse_stride,
                    FPTR, FIDX, PPTR, PIDX, PMID, TOK, tok_len, BLK, blk_len, block_size, sinks, max_distance, WF, WB, n_words,
                    KD, VD, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    GRAN_BLOCK: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_MD: tl.constexpr,
                    USE_WORDS: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
        pid_m, pid_bh, b, h, hk, offs_m = _query_program(H, G, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptr = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :], mask=offs_m[:, None] < q_len,
                    other=0.0)
        k_ptr = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        v_ptr = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        qpos = q_start + offs_m
        kv_end = k_start + kv_len

        # FULL tiles: dense, no mask (always inside [0, kv_len)).
        start = tl.load(FPTR + pid_m)
        end = tl.load(FPTR + pid_m + 1)
        for it in range(start, end):
            k0 = tl.load(FIDX + it) * BLOCK_N
            m_i, l_i, acc = _fwd_tile(q, k_ptr, v_ptr, KD, VD, b, hk, k0, offs_n, offs_d, skn, svn, kv_len,
                                      scale_log2, None, m_i, l_i, acc, False, False, PRECISION, TMA)

        # Partial tiles: with word tables, first the TOKEN_PARTIAL ones (the word bits are the whole mask and no key
        # runs past the end: a loop of its own, with unbounded loads), then the others (the whole predicate).
        start = tl.load(PPTR + pid_m)
        end = tl.load(PPTR + pid_m + 1)
        if USE_WORDS:
            mid = tl.load(PMID + pid_m)
            for it in range(start, mid):
                k0, mask = _partial_tile(it, PIDX, qpos, offs_n, k_start, kv_end, TOK, tok_len, WF, n_words, BLK,
                                         blk_len, block_size, sinks, max_distance, BLOCK_N, GRAN_BLOCK, HAS_SINKS,
                                         HAS_MD, True, True)
                m_i, l_i, acc = _fwd_tile(q, k_ptr, v_ptr, KD, VD, b, hk, k0, offs_n, offs_d, skn, svn, kv_len,
                                          scale_log2, mask, m_i, l_i, acc, True, False, PRECISION, TMA)
            start = mid
        for it in range(start, end):
            k0, mask = _partial_tile(it, PIDX, qpos, offs_n, k_start, kv_end, TOK, tok_len, WF, n_words, BLK, blk_len,
                                     block_size, sinks, max_distance, BLOCK_N, GRAN_BLOCK, HAS_SINKS, HAS_MD,
                                     USE_WORDS, False)
            m_i, l_i, acc = _fwd_tile(q, k_ptr, v_ptr, KD, VD, b, hk, k0, offs_n, offs_d, skn, svn, kv_len,
                                      scale_log2, mask, m_i, l_i, acc, True, True, PRECISION, TMA)

        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(LSE + pid_bh.to(tl.int64) * lse_stride + offs_m, lse)
        o_ptr = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh
        tl.store(o_ptr + offs_m[:, None].to(tl.int64) * som + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=offs_m[:, None] < q_len)

    @triton.jit
    def _delta_kernel(O, DO, DELTA, sob, soh, som, sdob, sdoh, sdom, H, q_len, lse_stride,
                      HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        """``DELTA[b*h, r] = sum_d O[b, h, r, d] * DO[b, h, r, d]`` in float32 for ``BLOCK`` rows (zero for rows past
        ``q_len`` up to the LSE buffer's length): the backward's row term, in one pass over ``O`` and ``dO``."""
        _, pid_bh, b, h, _, rows = _query_program(H, 1, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        rmask = (rows < q_len)[:, None]
        o = tl.load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows[:, None].to(tl.int64) * som
                    + offs_d[None, :], mask=rmask, other=0.0)
        do = tl.load(DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh + rows[:, None].to(tl.int64) * sdom
                     + offs_d[None, :], mask=rmask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + pid_bh.to(tl.int64) * lse_stride + rows, delta, mask=rows < lse_stride)

    @triton.jit
    def _dkdv_tile(k, v, q_ptr, do_ptr, QD, DOD, b, h, lse_ptr, delta_ptr, r0, offs_m, offs_d, sqm, sdom, q_len,
                   scale_log2, mask, dk, dv, MASKED: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
        """One query tile's (rows ``r0 + offs_m`` of query head ``h``) contribution to ``dk``/``dv [BLOCK_N,
        HEAD_DIM]``; ``TMA`` as in :func:`_rows_tile` (``QD``/``DOD``: the descriptors of Q and dO)."""
        rows = r0 + offs_m
        qT = _rows_tile(q_ptr, QD, b, h, r0, rows, offs_d, sqm, q_len, True, True, TMA)
        lse = tl.load(lse_ptr + rows)
        sT = tl.dot(k, qT, input_precision=PRECISION) * scale_log2
        pT = tl.exp2(sT - lse[None, :])
        if MASKED:
            pT = tl.where(mask, pT, 0.0)
        do = _rows_tile(do_ptr, DOD, b, h, r0, rows, offs_d, sdom, q_len, False, True, TMA)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        delta = tl.load(delta_ptr + rows)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, scale_log2, sm_scale,
                         sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                         sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                         H, HKV, G, q_len, kv_len, q_start, k_start, lse_stride,
                         FPTR, FIDX, PPTR, PIDX, PMID, TOK, tok_len, BLK, blk_len, block_size, sinks, max_distance, WF, WB, n_words,
                         QD, DOD, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         GRAN_BLOCK: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_MD: tl.constexpr,
                         USE_WORDS: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // HKV
        hk = pid_bh % HKV
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        nmask = offs_n < kv_len
        k = tl.load(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + offs_n[:, None].to(tl.int64) * skn
                    + offs_d[None, :], mask=nmask[:, None], other=0.0)
        v = tl.load(V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + offs_n[:, None].to(tl.int64) * svn
                    + offs_d[None, :], mask=nmask[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        kpos = k_start + offs_n
        kv_end = k_start + kv_len
        fstart = tl.load(FPTR + pid_n)
        fend = tl.load(FPTR + pid_n + 1)
        pstart = tl.load(PPTR + pid_n)
        pmid = tl.load(PMID + pid_n)
        pend = tl.load(PPTR + pid_n + 1)
        for g in range(G):
            h = hk * G + g
            q_ptr = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
            do_ptr = DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
            lse_ptr = LSE + (b * H + h).to(tl.int64) * lse_stride
            delta_ptr = DELTA + (b * H + h).to(tl.int64) * lse_stride
            for it in range(fstart, fend):
                r0 = tl.load(FIDX + it) * BLOCK_M
                dk, dv = _dkdv_tile(k, v, q_ptr, do_ptr, QD, DOD, b, h, lse_ptr, delta_ptr, r0, offs_m, offs_d, sqm,
                                    sdom, q_len, scale_log2, None, dk, dv, False, PRECISION, TMA)
            if USE_WORDS:  # TOKEN_PARTIAL tiles first: the word bits are the whole mask
                for it in range(pstart, pmid):
                    r0 = tl.load(PIDX + it) * BLOCK_M
                    maskT = word_mask(WB, n_words, q_start + r0 - kpos, BLOCK_M)
                    dk, dv = _dkdv_tile(k, v, q_ptr, do_ptr, QD, DOD, b, h, lse_ptr, delta_ptr, r0, offs_m, offs_d,
                                        sqm, sdom, q_len, scale_log2, maskT, dk, dv, True, PRECISION, TMA)
                rest = pmid
            else:
                rest = pstart
            for it in range(rest, pend):
                r0 = tl.load(PIDX + it) * BLOCK_M
                maskT = tile_mask(q_start + r0 + offs_m, kpos, kv_end, TOK, tok_len, WB, n_words, BLK, blk_len,
                                  block_size, sinks, max_distance, BLOCK_M, True, GRAN_BLOCK, HAS_SINKS, HAS_MD,
                                  USE_WORDS)
                dk, dv = _dkdv_tile(k, v, q_ptr, do_ptr, QD, DOD, b, h, lse_ptr, delta_ptr, r0, offs_m, offs_d, sqm,
                                    sdom, q_len, scale_log2, maskT, dk, dv, True, PRECISION, TMA)
        dk = dk * sm_scale
        tl.store(DK + b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + offs_n[:, None].to(tl.int64) * sdkn
                 + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=nmask[:, None])
        tl.store(DV + b.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh + offs_n[:, None].to(tl.int64) * sdvn
                 + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=nmask[:, None])

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, scale_log2, sm_scale,
                       sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
                       H, G, q_len, kv_len, q_start, k_start, lse_stride,
                       FPTR, FIDX, PPTR, PIDX, PMID, TOK, tok_len, BLK, blk_len, block_size, sinks, max_distance, WF, WB, n_words,
                       KD, VD, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       GRAN_BLOCK: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_MD: tl.constexpr,
                       USE_WORDS: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
        pid_m, pid_bh, b, h, hk, offs_m = _query_program(H, G, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        rmask = offs_m < q_len
        q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None].to(tl.int64) * sqm
                    + offs_d[None, :], mask=rmask[:, None], other=0.0)
        do = tl.load(DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh + offs_m[:, None].to(tl.int64) * sdom
                     + offs_d[None, :], mask=rmask[:, None], other=0.0)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * lse_stride + offs_m)
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * lse_stride + offs_m)
        k_ptr = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        v_ptr = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        qpos = q_start + offs_m
        kv_end = k_start + kv_len
        start = tl.load(FPTR + pid_m)
        end = tl.load(FPTR + pid_m + 1)
        for it in range(start, end):
            k0 = tl.load(FIDX + it) * BLOCK_N
            dq = _dq_tile(q, do, lse, delta, k_ptr, v_ptr, KD, VD, b, hk, k0, offs_n, offs_d, skn, svn, kv_len,
                          scale_log2, None, dq, False, False, PRECISION, TMA)
        start = tl.load(PPTR + pid_m)
        end = tl.load(PPTR + pid_m + 1)
        if USE_WORDS:  # TOKEN_PARTIAL tiles first, as in the forward
            mid = tl.load(PMID + pid_m)
            for it in range(start, mid):
                k0, mask = _partial_tile(it, PIDX, qpos, offs_n, k_start, kv_end, TOK, tok_len, WF, n_words, BLK,
                                         blk_len, block_size, sinks, max_distance, BLOCK_N, GRAN_BLOCK, HAS_SINKS,
                                         HAS_MD, True, True)
                dq = _dq_tile(q, do, lse, delta, k_ptr, v_ptr, KD, VD, b, hk, k0, offs_n, offs_d, skn, svn, kv_len,
                              scale_log2, mask, dq, True, False, PRECISION, TMA)
            start = mid
        for it in range(start, end):
            k0, mask = _partial_tile(it, PIDX, qpos, offs_n, k_start, kv_end, TOK, tok_len, WF, n_words, BLK, blk_len,
                                     block_size, sinks, max_distance, BLOCK_N, GRAN_BLOCK, HAS_SINKS, HAS_MD,
                                     USE_WORDS, False)
            dq = _dq_tile(q, do, lse, delta, k_ptr, v_ptr, KD, VD, b, hk, k0, offs_n, offs_d, skn, svn, kv_len,
                          scale_log2, mask, dq, True, True, PRECISION, TMA)
        dq = dq * sm_scale
        tl.store(DQ + b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh + offs_m[:, None].to(tl.int64) * sdqm
                 + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=rmask[:, None])


class _Ctx:
    """Everything a launch needs that follows from (pattern, shapes, offsets)."""

    def __init__(self, pattern, q, k, q_start, k_start, max_distance):
        self.pattern = pattern
        self.B, self.H, self.Lq, self.D = q.shape
        self.Hkv, self.Lk = k.shape[1], k.shape[2]
        self.G = self.H // self.Hkv
        self.q_start, self.k_start = int(q_start), int(k_start)
        self.max_distance = max_distance
        length = max(self.q_start + self.Lq, self.k_start + self.Lk, 1)
        self.tok, self.blk = pattern_tables(pattern, length, q.device)
        self.words = word_tables(pattern, self.tok) if os.environ.get("PPA_TRITON_WORDS", "1") == "1" else None
        self.fwd_cfg, self.dkdv_cfg, self.dq_cfg = configs(self.D, q.dtype, q.device)
        self.spec = (self.D, q.dtype)  # with a configuration, what sets a launch's shared memory (see run_fitting)
        self.flags = dict(GRAN_BLOCK=pattern.granularity == "block", HAS_SINKS=pattern.sink_tokens > 0,
                          HAS_MD=max_distance is not None, PRECISION=dot_precision(q.dtype))
        self.device = q.device

    def sources(self, *tensors: torch.Tensor, rows: int, direction: str = "forward") -> tuple:
        """What the kernels of ``direction`` read streamed tiles from: a descriptor of each tensor (``rows`` rows
        per load) where :func:`~.common.tma_wanted` and every tensor can back one, else the tensors themselves
        (pointer loads); and the ``TMA`` flag."""
        if tma_wanted(self.device, self.D, direction) and tma_ready(*tensors):
            return tuple(descriptor(x, rows) for x in tensors), True
        return tensors, False

    def lists(self, bm, bn, transpose=False):
        return device_lists(self.pattern, self.Lq, self.Lk, bm, bn, self.q_start, self.k_start, self.max_distance,
                            self.device, transpose)

    def pattern_args(self):
        wf, wb = self.words if self.words is not None else (self.tok, self.tok)
        return (self.tok, self.tok.numel(), self.blk, self.blk.numel(), self.pattern.block_size,
                self.pattern.sink_tokens, self.max_distance if self.max_distance is not None else 0,
                wf, wb, wf.numel())

    def use_words(self, ncols):
        return self.words is not None and ncols <= 64


def _forward(ctx: _Ctx, q, k, v, scale):
    lse_len = _lse_len(q)
    o = torch.empty_like(q)
    lse = torch.full((ctx.B, ctx.H, lse_len), float("inf"), device=q.device, dtype=torch.float32)

    def run(config):
        bm, bn, warps, stages = config
        fp, fi, pp, pi, pm = ctx.lists(bm, bn)
        sources, tma = ctx.sources(k, v, rows=bn)
        _fwd_kernel[(triton.cdiv(ctx.Lq, bm), ctx.B * ctx.H)](
            q, k, v, o, lse, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            ctx.H, ctx.G, ctx.Lq, ctx.Lk, ctx.q_start, ctx.k_start, lse_len,
            fp, fi, pp, pi, pm, *ctx.pattern_args(), *sources,
            HEAD_DIM=ctx.D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, USE_WORDS=ctx.use_words(bn),
            TMA=tma, **ctx.flags)

    run_fitting("forward", ctx.fwd_cfg, (0, 1), run, q.device, ctx.spec)
    return o, lse


def _backward(ctx: _Ctx, q, k, v, o, lse, do, scale):
    do, o = last_contiguous(do), last_contiguous(o)
    lse_len = lse.shape[-1]
    # Rows past q_len: LSE stays +inf (p = 0) and delta 0, over the whole LSE buffer (every kernel's padding rows)
    delta = torch.empty((ctx.B, ctx.H, lse_len), device=q.device, dtype=torch.float32)
    rows = 64 if ctx.D <= 128 else 32
    _delta_kernel[(triton.cdiv(lse_len, rows), ctx.B * ctx.H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), ctx.H, ctx.Lq,
        lse_len, HEAD_DIM=ctx.D, BLOCK=rows, num_warps=4)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    args = (*ctx.pattern_args(),)

    def run_dkdv(config):
        bm, bn, warps, stages = config
        assert lse_len >= triton.cdiv(ctx.Lq, bm) * bm
        fp, fi, pp, pi, pm = ctx.lists(bm, bn, transpose=True)
        sources, tma = ctx.sources(q, do, rows=bm, direction="backward")
        _bwd_dkdv_kernel[(triton.cdiv(ctx.Lk, bn), ctx.B * ctx.Hkv)](
            q, k, v, do, lse, delta, dk, dv, scale * LOG2E, scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            ctx.H, ctx.Hkv, ctx.G, ctx.Lq, ctx.Lk, ctx.q_start, ctx.k_start, lse_len,
            fp, fi, pp, pi, pm, *args, *sources,
            HEAD_DIM=ctx.D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, USE_WORDS=ctx.use_words(bm),
            TMA=tma, **ctx.flags)

    def run_dq(config):
        bm, bn, warps, stages = config
        assert lse_len >= triton.cdiv(ctx.Lq, bm) * bm
        fp, fi, pp, pi, pm = ctx.lists(bm, bn)
        sources, tma = ctx.sources(k, v, rows=bn, direction="backward")
        _bwd_dq_kernel[(triton.cdiv(ctx.Lq, bm), ctx.B * ctx.H)](
            q, k, v, do, lse, delta, dq, scale * LOG2E, scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            ctx.H, ctx.G, ctx.Lq, ctx.Lk, ctx.q_start, ctx.k_start, lse_len,
            fp, fi, pp, pi, pm, *args, *sources,
            HEAD_DIM=ctx.D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, USE_WORDS=ctx.use_words(bn),
            TMA=tma, **ctx.flags)

    run_fitting("dK/dV", ctx.dkdv_cfg, (0, 1), run_dkdv, q.device, ctx.spec)
    run_fitting("dQ", ctx.dq_cfg, (0, 1), run_dq, q.device, ctx.spec)
    return dq, dk, dv


@functools.lru_cache(maxsize=256)
def _pattern(key: tuple) -> PPAPattern:
    return PPAPattern(*key)


# The kernels enter autograd and torch.compile as custom ops: Dynamo does not trace into them (their host-side work,
# tile lists and tables, stays out of the graph), and their fake versions give the output shapes.
@torch.library.custom_op("ppa_hf::prefill_forward", mutates_args=())
def _prefill_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern_key: list[float], granularity: str,
                     q_start: int, k_start: int, max_distance: int | None, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = last_contiguous(q), last_contiguous(k), last_contiguous(v)
    ctx = _Ctx(_pattern(_key(pattern_key, granularity)), q, k, q_start, k_start, max_distance)
    return _forward(ctx, q, k, v, scale)


@_prefill_forward.register_fake
def _(q, k, v, pattern_key, granularity, q_start, k_start, max_distance, scale):
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[1], _lse_len(q)), dtype=torch.float32)


@torch.library.custom_op("ppa_hf::prefill_backward", mutates_args=())
def _prefill_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                      do: torch.Tensor, pattern_key: list[float], granularity: str, q_start: int, k_start: int,
                      max_distance: int | None, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = last_contiguous(q), last_contiguous(k), last_contiguous(v)
    ctx = _Ctx(_pattern(_key(pattern_key, granularity)), q, k, q_start, k_start, max_distance)
    return _backward(ctx, q, k, v, o, lse, do, scale)


@_prefill_backward.register_fake
def _(q, k, v, o, lse, do, pattern_key, granularity, q_start, k_start, max_distance, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *args = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.args = args


def _prefill_grad(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _prefill_backward(q, k, v, o, lse, do, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_prefill_forward.register_autograd(_prefill_grad, setup_context=_setup_context)


def _key(pattern_key, granularity: str) -> tuple:
    p, window, sinks, block_size = pattern_key
    return (float(p), int(window), int(sinks), granularity, int(block_size))


def _lse_len(q: torch.Tensor) -> int:
    """Row length of the LSE buffer: the query length rounded up to whole tiles of every kernel."""
    tiles = max(cfg[0] for cfg in configs(q.shape[-1], q.dtype, q.device))
    return max(-(-q.shape[2] // 128) * 128, -(-q.shape[2] // tiles) * tiles)


def triton_ppa_attention(query, key, value, pattern: PPAPattern, q_start: int | None = None, k_start: int = 0,
                         max_distance: int | None = None, scale: float | None = None) -> torch.Tensor:
    """PPA attention of one unpadded sequence per batch row. ``query [B, H, Q, D]``, ``key``/``value
    [B, Hkv, K, D]`` -> ``[B, H, Q, D]``; query row ``r`` sits at position ``q_start + r`` (default: the last
    ``Q`` of the keys), key ``c`` at ``k_start + c``. Differentiable (Triton backward); traceable by torch.compile."""
    reason = unsupported_reason(query, key, value)
    if reason is not None:
        raise ValueError(f"the Triton attention kernel cannot run: {reason}")
    if q_start is None:
        q_start = key.shape[2] - query.shape[2] + k_start
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    p, window, sinks, granularity, block_size = pattern._key
    out, _ = _prefill_forward(query, key, value, [p, window, sinks, block_size], granularity, int(q_start),
                              int(k_start), max_distance, scale)
    return out
