"""The forward kernel of ppa_hf/ops/triton/prefill.py as it was before TOKEN_PARTIAL tiles got a loop of their own,
with a ``VARIANT`` switch for measuring what the token mask costs (benchmarks/experiments/token_mask.py):

* 0: the kernel as it was (one loop over every partial tile, a branch per tile, bounded key/value loads);
* 1: TOKEN_PARTIAL tiles in a loop of their own with unbounded loads (what prefill.py now does);
* 2: variant 1 without any mask on those tiles: a wrong result, timed only as the unmasked kernel's cost;
* 3: variant 1 with the 64-bit row words read as two 32-bit halves.

A scratch copy of the old kernel loop for measurement, not used by the package; it calls the package's tile
step (``_fwd_tile``: bounded loads for variant 0's partial tiles, unbounded for the others').
"""
from ppa_hf.ops.triton.common import tile_mask, tl, triton, word_mask
from ppa_hf.ops.triton.prefill import _fwd_tile, _query_program  # the package's tile step serves every variant

if triton is not None:

    @triton.jit
    def _partial_tile(it, mid, PIDX, qpos, offs_n, k_start, kv_end, TOK, tok_len, WF, n_words, BLK, blk_len,
                      block_size, sinks, max_distance, BLOCK_N: tl.constexpr, GRAN_BLOCK: tl.constexpr,
                      HAS_SINKS: tl.constexpr, HAS_MD: tl.constexpr, USE_WORDS: tl.constexpr):
        """Key columns ``[BLOCK_N]`` and ``[BLOCK_M, BLOCK_N]`` mask of a query tile's ``it``-th partial tile: a
        TOKEN_PARTIAL tile (``it < mid``) from the token table's words alone, any other from the whole predicate."""
        k0 = tl.load(PIDX + it) * BLOCK_N
        cols = k0 + offs_n
        if USE_WORDS and it < mid:
            mask = word_mask(WF, n_words, qpos - (k_start + k0), BLOCK_N)
        else:
            mask = tile_mask(qpos, k_start + cols, kv_end, TOK, tok_len, WF, n_words, BLK, blk_len, block_size,
                             sinks, max_distance, BLOCK_N, False, GRAN_BLOCK, HAS_SINKS, HAS_MD, USE_WORDS)
        return k0, mask

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, scale_log2,
                    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                    H, G, q_len, kv_len, q_start, k_start, lse_stride,
                    FPTR, FIDX, PPTR, PIDX, PMID, TOK, tok_len, BLK, blk_len, block_size, sinks, max_distance, WF, WB, n_words,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    GRAN_BLOCK: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_MD: tl.constexpr,
                    USE_WORDS: tl.constexpr, VARIANT: tl.constexpr, WLO, WHI):
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
            m_i, l_i, acc = _fwd_tile(q, k_ptr, v_ptr, k_ptr, v_ptr, 0, 0, k0, offs_n, offs_d, skn, svn, kv_len,
                                      scale_log2, None, m_i, l_i, acc, False, False, "tf32", False)

        # Partial tiles: TOKEN_PARTIAL ones (the token table's word bits are the whole mask), then the others
        # (the whole predicate per element).
        start = tl.load(PPTR + pid_m)
        mid = tl.load(PMID + pid_m)
        end = tl.load(PPTR + pid_m + 1)
        if VARIANT == 0:
            for it in range(start, end):
                k0, mask = _partial_tile(it, mid, PIDX, qpos, offs_n, k_start, kv_end, TOK, tok_len, WF, n_words,
                                         BLK, blk_len, block_size, sinks, max_distance, BLOCK_N, GRAN_BLOCK, HAS_SINKS,
                                         HAS_MD, USE_WORDS)
                m_i, l_i, acc = _fwd_tile(q, k_ptr, v_ptr, k_ptr, v_ptr, 0, 0, k0, offs_n, offs_d, skn, svn, kv_len,
                                          scale_log2, mask, m_i, l_i, acc, True, True, "tf32", False)

        else:
            for it in range(start, mid):
                k0 = tl.load(PIDX + it) * BLOCK_N
                if VARIANT == 1:
                    mask = word_mask(WF, n_words, qpos - (k_start + k0), BLOCK_N)
                elif VARIANT == 3:
                    x = qpos - (k_start + k0)
                    xi = tl.minimum(tl.maximum(x + 256, 0), n_words - 1)
                    lo = tl.load(WLO + xi)
                    hi = tl.load(WHI + xi)
                    c = tl.arange(0, BLOCK_N)
                    w = tl.where((c < 32)[None, :], lo[:, None], hi[:, None])
                    mask = (w << (31 - (c % 32))[None, :]) < 0
                else:
                    mask = None
                m_i, l_i, acc = _fwd_tile(q, k_ptr, v_ptr, k_ptr, v_ptr, 0, 0, k0, offs_n, offs_d, skn, svn, kv_len,
                                          scale_log2, mask, m_i, l_i, acc, VARIANT != 2, False, "tf32", False)
            for it in range(mid, end):
                k0, mask = _partial_tile(it, mid, PIDX, qpos, offs_n, k_start, kv_end, TOK, tok_len, WF, n_words,
                                         BLK, blk_len, block_size, sinks, max_distance, BLOCK_N, GRAN_BLOCK, HAS_SINKS,
                                         HAS_MD, False)
                m_i, l_i, acc = _fwd_tile(q, k_ptr, v_ptr, k_ptr, v_ptr, 0, 0, k0, offs_n, offs_d, skn, svn, kv_len,
                                          scale_log2, mask, m_i, l_i, acc, True, True, "tf32", False)

        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(LSE + pid_bh.to(tl.int64) * lse_stride + offs_m, lse)
        o_ptr = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh
        tl.store(o_ptr + offs_m[:, None].to(tl.int64) * som + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=offs_m[:, None] < q_len)
