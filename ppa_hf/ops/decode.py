"""Decoding path: a few queries against a long KV cache read only their attended keys.

For each query the attended kv indices (``w + T**p`` of them, plus sinks) are listed from the same
predicate as every other path, then K and V rows are gathered and attention runs on those rows only.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..masking import PPALayout
from ..pattern import PPAPattern
from .naive import layout_keep


def gather_indices(layout: PPALayout, pattern: PPAPattern, max_distance: int | None = None):
    """``(index [B, Q, N] long, valid [B, Q, N] bool)``: attended kv indices of each query, ascending, padded.

    ``N`` is the largest number of attended keys of any query. Cached on the layout (shared by layers).
    """
    key = ("gather", pattern, max_distance)
    if key not in layout.cache:
        keep = layout_keep(layout, pattern, max_distance)[:, 0]  # [B, Q, K]
        count = keep.sum(-1)
        n = max(int(count.max()), 1)
        # Stable sort puts kept indices first, in ascending order.
        order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
        valid = torch.arange(n, device=keep.device) < count[..., None]
        layout.cache[key] = (order, valid)
    return layout.cache[key]


def _attended_offsets(pattern: PPAPattern, length: int) -> np.ndarray:
    """Sorted token offsets of ``pattern.token_table`` (window, plus far offsets for the token granularity) below
    ``length`` (the table's power-of-two size), cached so decoding step after step lists them once."""
    table = pattern.token_table(length)
    key = (pattern.p, pattern.window, pattern.granularity, table.numel())
    if key not in _OFFSETS:
        _OFFSETS[key] = np.flatnonzero(table.numpy())
    return _OFFSETS[key]


_OFFSETS: dict = {}


def host_decode_index(pattern: PPAPattern, q_start: int, q_len: int, k_start: int, kv_len: int,
                      max_distance: int | None, device):
    """Attended kv indices of queries at positions ``q_start ..`` against keys at positions ``k_start ..``, built
    on the host from the pattern's offset / block tables (no GPU work, no device sync): ``(index [1, Q, N] int32,
    count [1, Q] int32)`` on ``device``. Same set as :meth:`PPAPattern.keep` (tests compare them)."""
    t_end = q_start + q_len
    offs = _attended_offsets(pattern, t_end + 1)
    rows = []
    blk = pattern.block_table(t_end + 1).numpy() if pattern.granularity == "block" else None
    for t in range(q_start, t_end):
        o = offs[: np.searchsorted(offs, t, side="right")]
        keys = t - o  # window (and far token offsets)
        if blk is not None:
            bs = pattern.block_size
            tb = t // bs
            keys = keys[~blk[tb - keys // bs]]  # window keys outside attended blocks
            dbs = np.flatnonzero(blk[: tb + 1])
            kb = tb - dbs
            blocks = (kb[:, None] * bs + np.arange(bs)[None, :]).ravel()
            keys = np.concatenate([blocks[blocks <= t], keys])
        if pattern.sink_tokens:
            sinks = np.arange(min(pattern.sink_tokens, t + 1))
            keys = np.concatenate([keys, sinks[~np.isin(sinks, keys)]])
        if max_distance is not None:
            keys = keys[t - keys < max_distance]
        keys = keys[(keys >= k_start) & (keys < k_start + kv_len)] - k_start
        rows.append(keys)
    n = max(max((r.size for r in rows), default=0), 1)
    index = np.zeros((1, q_len, n), dtype=np.int32)
    count = np.zeros((1, q_len), dtype=np.int32)
    for i, r in enumerate(rows):
        index[0, i, : r.size] = r
        count[0, i] = r.size
    return (torch.from_numpy(index).to(device, non_blocking=True),
            torch.from_numpy(count).to(device, non_blocking=True))


def decode_index(layout: PPALayout, pattern: PPAPattern, max_distance: int | None = None):
    """``(index [B or 1, Q, N] int32, count [B or 1, Q] int32)`` for the fused Triton decode kernel, cached on the
    layout (built once per forward pass, shared by every layer).

    When every row is one unpadded sequence starting at kv index 0 (the usual ``generate`` cache) the list is
    built once for the whole batch from :meth:`PPAPattern.keep` on the positions (``[Q, K]`` work, no sort);
    otherwise from the layout's own keep mask (:func:`gather_indices`).

    The simple case is built on the host (:func:`host_decode_index`), so decoding needs no device sync here.
    """
    key = ("decode_index", pattern, max_distance)
    if key not in layout.cache:
        from .block_sparse import simple_layout

        simple = simple_layout(layout)
        if simple is not None and simple[2] is None:
            q0, k0, _ = simple
            Q, K = int(layout.q_index.numel()), layout.kv_length
            layout.cache[key] = host_decode_index(pattern, q0, Q, k0, K, max_distance, layout.device)
        else:
            order, valid = gather_indices(layout, pattern, max_distance)
            layout.cache[key] = (order.to(torch.int32).contiguous(), valid.sum(-1, dtype=torch.int32))
    return layout.cache[key]


def decode_attention(query, key, value, layout: PPALayout, pattern: PPAPattern, scale: float | None = None,
                     max_distance: int | None = None) -> torch.Tensor:
    """``query [B, H, Q, D]``, ``key``/``value [B, Hkv, K, D]`` -> ``[B, H, Q, D]``, reading ``N << K`` rows.

    On CUDA (and for bf16/fp16 inputs the Triton kernels support) this is one fused gather + attention kernel
    (:func:`~ppa_hf.ops.triton_attention.triton_decode_attention`); elsewhere the rows are gathered with torch.
    """
    from . import triton_attention as tri

    if query.device.type == "cuda" and query.dtype != torch.float32 and tri.supports(query, key, value):
        index, count = decode_index(layout, pattern, max_distance)
        return tri.triton_decode_attention(query, key, value, index, count, scale)
    B, H, Q, D = query.shape
    Hkv = key.shape[1]
    index, valid = gather_indices(layout, pattern, max_distance)
    N = index.shape[-1]
    flat = index.reshape(B, 1, Q * N, 1)
    k_sel = key.gather(2, flat.expand(B, Hkv, Q * N, D)).view(B, Hkv, Q, N, D)
    v_sel = value.gather(2, flat.expand(B, Hkv, Q * N, value.shape[-1])).view(B, Hkv, Q, N, value.shape[-1])
    q = query.view(B, Hkv, H // Hkv, Q, D)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = torch.promote_types(query.dtype, torch.float32)  # softmax in float32 or wider
    scores = torch.einsum("bhgqd,bhqnd->bhgqn", q, k_sel).to(acc) * scale
    mask = valid[:, None, None]  # [B, 1, 1, Q, N]
    row_any = mask.any(-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~row_any, 0.0)
    probs = torch.softmax(scores, dim=-1) * row_any
    out = torch.einsum("bhgqn,bhqnd->bhgqd", probs.to(value.dtype), v_sel)
    return out.reshape(B, H, Q, value.shape[-1])
