"""Gathered decoding: a few queries against a long KV cache read only the keys they attend.

:func:`decode_index` lists, once per forward pass, the kv indices each query attends (``w + T**p`` of them, plus
sinks) from the pattern's tables; :func:`gather_decode_attention` gathers those K/V rows with torch and attends over
them (any device, any dtype, with gradients). The fused Triton kernel (:mod:`ppa_hf.ops.triton.decode`) reads the
same index list.
"""

from __future__ import annotations

import math

import torch

from ..layout import PPALayout
from ..pattern import PPAPattern
from .reference import layout_keep


def decode_index(layout: PPALayout, pattern: PPAPattern, max_distance: int | None = None):
    """``(index [B, Q, N] int32, count [B, Q] int32)``: the kv indices (into the keys handed to attention) each query
    attends. The first ``count`` entries of a row hold them; entries that are not attended hold -1. Cached on the
    layout (built once per forward pass, shared by every layer).

    When every row holds one sequence of consecutive real tokens (no packing; left or right padding; the usual
    ``generate`` cache) the lists come from :meth:`PPAPattern.key_lists` on the query positions: elementwise work,
    no host synchronisation, and ``N`` depends only on the cache length. Otherwise (packed sequences) from the
    layout's keep mask, sorted (one synchronisation for ``N``)."""
    key = ("decode_index", pattern, max_distance)
    if key not in layout.cache:
        q_real = layout.q_seg() >= 0  # padding queries attend nothing
        if layout.contiguous:
            keys, count = pattern.key_lists(layout.q_pos(), layout.seg.shape[-1], max_distance)
            local = keys + (layout.row_start - layout.kv_offset)[:, None, None]  # position -> index among the keys
            ok = (keys >= 0) & (local >= 0) & (local < layout.kv_length) & q_real[..., None]
            index = torch.where(ok, local, -1)
            count = torch.where(q_real, count, 0)
        else:
            keep = layout_keep(layout, pattern, max_distance)[:, 0]  # [B, Q, K]
            count = keep.sum(-1)
            n = max(int(count.max()), 1)
            order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :n]  # kept ones first
            index = torch.where(torch.arange(n, device=keep.device) < count[..., None], order, -1)
        layout.cache[key] = (index.to(torch.int32).contiguous(), count.to(torch.int32).contiguous())
    return layout.cache[key]


def gather_decode_attention(query, key, value, index: torch.Tensor, count: torch.Tensor,
                            scale: float | None = None) -> torch.Tensor:
    """``query [B, H, Q, D]``, ``key``/``value [B, Hkv, K, D]``, ``index [B, Q, N]`` / ``count [B, Q]`` (from
    :func:`decode_index`) -> ``[B, H, Q, D]``, reading only the indexed rows. A query with no key returns zeros."""
    B, H, Q, D = query.shape
    Hkv, N = key.shape[1], index.shape[-1]
    valid = (index >= 0) & (torch.arange(N, device=index.device) < count[..., None])  # [B, Q, N]
    flat = index.clamp(min=0).long().reshape(B, 1, Q * N, 1)
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
