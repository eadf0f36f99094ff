"""The decode index list in one Triton launch: what :func:`ppa_hf.ops.gather.decode_index` computes with about 25
torch operations (each a kernel launch and ~20 us of host time on a GPU host), for layouts with one sequence per row
(padding anywhere: what ``generate`` produces). It reads the layout's ``valid [B, T]`` only, so the layout's
``seg``/``pos`` are never built in a decoding step. Same tables, same list order, same counts; the tests compare the
two entry by entry within each query's count.

One program per batch row: it ranks the row's real tokens (a running cumulative sum; with one sequence per row a
real token's position is its rank) and writes each one's kv index at the slot of its position, then fills each
query's list from the pattern's offset tables, reading kv indices from those slots.
"""

from __future__ import annotations

import torch

from ...layout import PPALayout
from ...pattern import PPAPattern
from .common import last_contiguous, launch, pattern_tables, table_hit, tl, triton

if triton is not None:

    _INDEX_INTS = ["T", "svb", "NQ", "n_offs", "n_dbs", "tok_len", "blk_len", "kv_offset", "max_distance",
                   "sinks", "window", "block_size", "sib", "siq", "N"]

    @triton.jit
    def _list_entries(slots, idx_row, entry, key, ok, q, N, kv_offset, max_distance, HAS_MD: tl.constexpr):
        """Write list entries ``entry`` (``[BLOCK]``): the kv index (from ``slots``, position -> kv index) of position
        ``key`` where ``ok``, else -1."""
        if HAS_MD:  # the model's own sliding window
            ok = ok & (q - key < max_distance)
        kv = tl.load(slots + tl.maximum(key, 0), mask=ok, other=-1)
        kv = tl.where(kv >= kv_offset, kv - kv_offset, -1)  # keys before those handed to attention: not attended
        tl.store(idx_row + entry, tl.where(ok, kv, -1), mask=entry < N)

    @triton.jit(do_not_specialize=_INDEX_INTS)
    def _decode_index_kernel(VALID, QIDX, OFFS, DBS, TOK, BLK, WORK, IDX, CNT,
                             T, svb, NQ, n_offs, n_dbs, tok_len, blk_len, kv_offset, max_distance, sinks, window,
                             block_size, sib, siq, N,
                             BLOCK: tl.constexpr, SCAN: tl.constexpr, GRAN_BLOCK: tl.constexpr,
                             HAS_SINKS: tl.constexpr, HAS_MD: tl.constexpr):
        b = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        valid_row = VALID + b.to(tl.int64) * svb
        slots = WORK + b.to(tl.int64) * 2 * T  # position -> kv index of the row's real tokens
        ranks = slots + T  # kv index -> position (rank among the real tokens), -1 on padding
        # 1. ranks of the row's real tokens (a running cumulative sum), and the slot of each
        carry = 0
        for start in range(0, T, SCAN):  # (one program per row: wide steps keep the loop short at 128k)
            t = start + tl.arange(0, SCAN)
            real = tl.load(valid_row + t, mask=t < T, other=0) != 0
            ones = real.to(tl.int32)
            rank = carry + tl.cumsum(ones, 0) - 1
            tl.store(slots + rank, t, mask=real)
            tl.store(ranks + t, tl.where(real, rank, -1), mask=t < T)
            carry += tl.sum(ones, 0)
        tl.debug_barrier()  # every slot written before any list reads one
        # 2. each query's list, in the order of PPAPattern.key_lists
        for qi in range(NQ):
            q_rank = tl.load(ranks + tl.load(QIDX + qi))
            q_real = q_rank >= 0
            q = tl.maximum(q_rank, 0)  # a padding query: position 0, as in the layout (its count is 0)
            idx_row = IDX + b.to(tl.int64) * sib + qi * siq
            count = 0
            base = 0
            if HAS_SINKS:  # sinks not attended through the rest of the pattern
                for start in range(0, sinks, BLOCK):
                    j = start + offs
                    hit = table_hit(TOK, q - j, tok_len)
                    if GRAN_BLOCK:
                        hit = hit | table_hit(BLK, q // block_size - j // block_size, blk_len)
                    ok = (j < sinks) & (j <= q) & (hit == 0)
                    _list_entries(slots, idx_row, j, j, ok, q, N, kv_offset, max_distance, HAS_MD)
                base = sinks
                count = sinks
            if GRAN_BLOCK:
                # the window keys outside attended blocks, then whole attended blocks (diagonal first)
                for start in range(0, window, BLOCK):
                    d = start + offs
                    key = q - d
                    in_block = table_hit(BLK, q // block_size - tl.maximum(key, 0) // block_size, blk_len)
                    ok = (d < window) & (d <= q) & (in_block == 0)
                    _list_entries(slots, idx_row, base + d, key, ok, q, N, kv_offset, max_distance, HAS_MD)
                base += window
                count += window
                qb = q // block_size
                for start in range(0, n_dbs * block_size, BLOCK):
                    e = start + offs
                    inside = e < n_dbs * block_size
                    dbs = tl.load(DBS + e // block_size, mask=inside, other=0)
                    kb = qb - dbs
                    key = kb * block_size + e % block_size
                    ok = inside & (kb >= 0) & (key <= q)
                    _list_entries(slots, idx_row, base + e, key, ok, q, N, kv_offset, max_distance, HAS_MD)
                for start in range(0, n_dbs, BLOCK):
                    i = start + offs
                    dbs = tl.load(DBS + i, mask=i < n_dbs, other=0)
                    count += tl.sum(((i < n_dbs) & (dbs <= qb)).to(tl.int32), 0) * block_size
            else:
                for start in range(0, n_offs, BLOCK):
                    i = start + offs
                    d = tl.load(OFFS + i, mask=i < n_offs, other=0)
                    ok = (i < n_offs) & (d <= q)
                    _list_entries(slots, idx_row, base + i, q - d, ok, q, N, kv_offset, max_distance, HAS_MD)
                    count += tl.sum(ok.to(tl.int32), 0)
            tl.store(CNT + b * NQ + qi, tl.where(q_real, count, 0))


def triton_decode_index(layout: PPALayout, pattern: PPAPattern, max_distance: int | None = None):
    """:func:`ppa_hf.ops.gather.decode_index` for a layout with one sequence per row, in one kernel launch:
    ``(index [B, Q, N] int32, count [B, Q] int32)``, equal entry by entry. Cached on the layout under the same key
    (built once per forward pass, shared by every layer and by the torch path)."""
    key = ("decode_index", pattern.key, max_distance)
    if key in layout.cache:
        return layout.cache[key]
    if not layout.one_sequence_per_row:
        raise ValueError("triton_decode_index needs a layout with one sequence per row (see PPALayout); use "
                         "ppa_hf.ops.gather.decode_index for packed sequences")
    valid = last_contiguous(layout.valid)
    B, T = valid.shape
    NQ = int(layout.q_index.numel())
    device = valid.device
    tok, blk = pattern_tables(pattern, T, device)
    if pattern.is_block:
        offs = tok  # not read
        dbs = pattern.block_offsets(T, device)
        n = pattern.sink_tokens + pattern.window + dbs.numel() * pattern.block_size
    else:
        offs = pattern.offsets(T, device)
        dbs = tok  # not read
        n = pattern.sink_tokens + offs.numel()
    index = torch.empty(B, NQ, n, dtype=torch.int32, device=device)
    count = torch.empty(B, NQ, dtype=torch.int32, device=device)
    work = torch.empty(B, 2 * max(T, 1), dtype=torch.int32, device=device)  # the kernel's slots and ranks
    md = -1 if max_distance is None else int(max_distance)
    launch(_decode_index_kernel, (B,),
           (valid, layout.q_index, offs, dbs, tok, blk, work, index,
            count, T, valid.stride(0), NQ, offs.numel(), dbs.numel(), tok.numel(), blk.numel(),
            layout.kv_offset, md, pattern.sink_tokens, pattern.window, pattern.block_size,
            index.stride(0), index.stride(1), n),
           dict(BLOCK=1024, SCAN=4096, GRAN_BLOCK=pattern.is_block, HAS_SINKS=pattern.sink_tokens > 0,
                HAS_MD=max_distance is not None), num_warps=8)
    layout.cache[key] = (index, count)
    return index, count
