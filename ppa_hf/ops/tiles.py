"""Tile classification of the PPA pattern, computed from :class:`~ppa_hf.pattern.PPAPattern`'s tables.

A tile is the rectangle of ``BM`` consecutive query positions by ``BN`` consecutive key positions. Every tile is
one of

* ``EMPTY`` (0): no pair of the tile is attended; kernels skip it,
* ``PARTIAL`` (1): some pairs are attended; kernels evaluate the pattern per element,
* ``FULL`` (2): every pair is attended; kernels run it as a dense tile, with no per-element mask,
* ``TOKEN_PARTIAL`` (3): a PARTIAL tile whose pairs are attended exactly where the token table says so (``d >= 0``
  and ``token_table[d]``; no block part, no sink, no model window, no key past the end); kernels read its mask from
  the word tables alone, the cheapest per-element mask. Every partial tile of the token pattern away from sinks and
  the sequence end is one.

No ``L x L`` tensor is built: a tile covers the contiguous range of backward offsets ``d = i - j`` in
``[q0 - k1, q1 - k0]`` (every integer of it is realised by some pair of the tile), so "some / every offset of the
tile attended" follows from a prefix sum over the token offset table; the block part likewise from the block
table over the block-offset range ``[q0//B - k1//B, q1//B - k0//B]``; sinks from ``k0 < s``. The cost is
``O(tiles)``. The classification is exact for EMPTY and FULL (the kernels rely on that) and may call a tile
PARTIAL that is in fact empty or full (correct, only slower): that happens only for block-granular tiles that
straddle the diagonal block, or for tiles that mix parts (window and far) of the pattern.

Positions: query row ``r`` sits at position ``q_start + r``, key column ``c`` at ``k_start + c`` (one unpadded
sequence, the same for every batch row). ``max_distance`` (a model's own sliding window) keeps only ``d <
max_distance``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..cache import BoundedCache
from ..pattern import PPAPattern

EMPTY, PARTIAL, FULL, TOKEN_PARTIAL = 0, 1, 2, 3


def _prefix(table: np.ndarray) -> np.ndarray:
    out = np.zeros(table.size + 1, dtype=np.int64)
    np.cumsum(table, out=out[1:])
    return out


def _range_count(prefix: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Number of True table entries in ``[lo, hi]`` (0 where ``hi < lo``); ``lo, hi`` clipped to the table."""
    n = prefix.size - 1
    lo_c, hi_c = np.clip(lo, 0, n), np.clip(hi + 1, 0, n)
    return np.where(hi_c > lo_c, prefix[hi_c] - prefix[np.minimum(lo_c, hi_c)], 0)


@lru_cache(maxsize=64)
def tile_classes(pattern: PPAPattern, q_len: int, kv_len: int, block_m: int, block_n: int, q_start: int | None = None,
                 k_start: int = 0, max_distance: int | None = None, ragged_partial: bool = True) -> np.ndarray:
    """``[ceil(q_len/BM), ceil(kv_len/BN)]`` int8 array of EMPTY / PARTIAL / FULL / TOKEN_PARTIAL (see the module
    docstring).

    ``q_start`` defaults to ``kv_len - q_len + k_start`` (the queries are the last ``q_len`` keys).
    ``ragged_partial``: a key tile that runs past ``kv_len`` is never FULL (kernels then mask the overhang).
    Cached (the arguments are hashable); treat the result as read-only.
    """
    if q_start is None:
        q_start = kv_len - q_len + k_start
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    qb, kb = np.arange(nq)[:, None], np.arange(nk)[None, :]
    q0 = q_start + qb * block_m
    q1 = q_start + np.minimum((qb + 1) * block_m, q_len) - 1
    k0 = k_start + kb * block_n
    k1 = k_start + np.minimum((kb + 1) * block_n, kv_len) - 1
    dmin, dmax = q0 - k1, q1 - k0  # every d in [dmin, dmax] is realised by a pair of the tile
    md = np.iinfo(np.int64).max if max_distance is None else int(max_distance)
    top = np.minimum(dmax, md - 1)  # largest attendable offset of the tile
    lo = np.maximum(dmin, 0)
    possible = top >= lo  # some pair with 0 <= d < md
    in_range = (dmin >= 0) & (dmax < md)  # every pair has 0 <= d < md

    length = int(max(q_start + q_len, k_start + kv_len, 1)) + 1
    tok_prefix = _prefix(pattern.token_table_np(length))
    cnt = _range_count(tok_prefix, lo, top)
    nonempty = possible & (cnt > 0)
    full = in_range & (cnt == dmax - dmin + 1)

    if pattern.is_block:
        bs = pattern.block_size
        blk_prefix = _prefix(pattern.block_table_np(length // bs + 2))
        dbmin, dbmax = q0 // bs - k1 // bs, q1 // bs - k0 // bs
        far_any = _range_count(blk_prefix, np.maximum(dbmin, 1), dbmax) > 0
        diag = (dbmin <= 0) & (dbmax >= 0)  # pairs in the same block: conservatively "maybe attended"
        nonempty |= possible & (far_any | diag)
        full |= in_range & (_range_count(blk_prefix, dbmin, dbmax) == dbmax - dbmin + 1) & (dbmin >= 0)

    s = pattern.sink_tokens
    if s:
        nonempty |= possible & (k0 < s)
        full |= in_range & (k1 < s)

    if pattern.is_full:  # p = 1: every causal pair
        nonempty = possible.copy()
        full = in_range.copy()

    out = np.where(full, FULL, np.where(nonempty, PARTIAL, EMPTY)).astype(np.int8)
    if ragged_partial and kv_len % block_n:
        last = out[:, -1]
        last[last == FULL] = PARTIAL
    if not pattern.is_block:  # the token table alone decides, where no sink, model window or overhang interferes
        whole = (kb + 1) * block_n <= kv_len
        token_only = (out == PARTIAL) & (k0 >= s) & (dmax < md) & whole
        out[token_only] = TOKEN_PARTIAL
    out.setflags(write=False)
    return out


def tile_density(classes: np.ndarray) -> dict:
    """Counts of EMPTY / PARTIAL / FULL tiles (for reports)."""
    return {"empty": int((classes == EMPTY).sum()), "partial": int((classes == PARTIAL).sum()),
            "token_partial": int((classes == TOKEN_PARTIAL).sum()), "full": int((classes == FULL).sum()),
            "tiles": int(classes.size)}


def csr_lists(classes: np.ndarray, kinds, transpose: bool = False):
    """CSR of the tiles whose class is in ``kinds`` per row (per column when ``transpose``): ``(ptr [n+1] int32,
    idx [nnz] int32)``; within a row, tiles in the order of ``kinds``, then ascending."""
    c = classes.T if transpose else classes
    kinds = (kinds,) if isinstance(kinds, int) else tuple(kinds)
    rank = np.full(c.shape, len(kinds), dtype=np.int64)
    for i, kind in enumerate(kinds):
        rank[c == kind] = i
    order = np.argsort(rank * c.shape[1] + np.arange(c.shape[1])[None, :], axis=1, kind="stable")
    n = (rank < len(kinds)).sum(1)
    ptr = np.zeros(c.shape[0] + 1, dtype=np.int32)
    np.cumsum(n, out=ptr[1:])
    idx = np.concatenate([order[r, : n[r]] for r in range(c.shape[0])]) if c.shape[0] else np.zeros(0, np.int64)
    return ptr, idx.astype(np.int32)


_LISTS = BoundedCache("tile lists", 64)


def device_lists(pattern: PPAPattern, q_len: int, kv_len: int, block_m: int, block_n: int, q_start: int, k_start: int,
                 max_distance, device, transpose: bool = False):
    """``(full_ptr, full_idx, part_ptr, part_idx, part_mid)`` int32 tensors on ``device``: the FULL tiles of each query
    tile (of each key tile when ``transpose``), and its partial tiles, TOKEN_PARTIAL ones first: row ``r``'s
    TOKEN_PARTIAL tiles are ``part_idx[part_ptr[r]:part_mid[r]]``, its other PARTIAL ones
    ``part_idx[part_mid[r]:part_ptr[r+1]]``. Cached per arguments."""

    def build():
        classes = tile_classes(pattern, q_len, kv_len, block_m, block_n, q_start, k_start, max_distance)
        fp, fi = csr_lists(classes, FULL, transpose)
        pp, pi = csr_lists(classes, (TOKEN_PARTIAL, PARTIAL), transpose)
        per_row = (classes.T if transpose else classes) == TOKEN_PARTIAL
        mid = (pp[:-1] + per_row.sum(1)).astype(np.int32)
        # an empty index list still needs one element to be a valid kernel argument
        return tuple(torch.from_numpy(np.ascontiguousarray(x if x.size else np.zeros(1, np.int32))).to(device)
                     for x in (fp, fi, pp, pi, mid))

    return _LISTS.get((pattern, q_len, kv_len, block_m, block_n, q_start, k_start, max_distance, str(device),
                       transpose), build)
