"""Gathered decoding: a few queries against a long KV cache read only the keys they attend.

:func:`decode_index` lists, once per forward pass, the kv indices each query attends (``w + T**p`` of them, plus
sinks) from the pattern's tables; :func:`gather_decode_attention` gathers those K/V rows with torch and attends over
them (any device, any dtype, with gradients). The fused Triton kernel (:mod:`ppa_hf.ops.triton.decode`) reads the
same index list.
"""

from __future__ import annotations

import math

import torch

from ..layout import PPALayout, running_count
from ..pattern import PPAPattern


def decode_index(layout: PPALayout, pattern: PPAPattern, max_distance: int | None = None):
    """``(index [B, Q, N] int32, count [B, Q] int32)``: the kv indices (into the keys handed to attention) each query
    attends. The first ``count`` entries of a row hold them; entries that are not attended hold -1. Cached on the
    layout (built once per forward pass, shared by every layer).

    The key positions come from :meth:`PPAPattern.key_lists` on the query positions; a position becomes a kv index
    through the rank of the query among the real tokens of its row (a sequence's tokens are consecutive real tokens,
    so position ``P`` of the query's sequence is real token number ``rank(query) - pos(query) + P``). This serves
    every layout (left or right padding, packed sequences, holes) with elementwise work and gathers: no host
    synchronisation, and ``N`` depends only on the kv axis length (static under a static cache)."""
    key = ("decode_index", pattern.key, max_distance)
    if key not in layout.cache:
        seg, B, T = layout.seg, layout.seg.shape[0], layout.seg.shape[-1]
        real = seg >= 0
        q_pos = layout.q_pos()  # [B, Q]
        keys, count = pattern.key_lists(q_pos, T, max_distance)  # [B, Q, N] positions, -1 = none
        if layout.one_sequence_per_row:  # a real token's position is its rank: the keys' positions are their ranks
            rank = layout.pos
            key_rank = torch.where(keys >= 0, keys, T + 1)
        else:
            rank = running_count(real) - 1  # [B, T]: index among the row's real tokens
            first = layout.at_queries(rank) - q_pos  # rank of each query's sequence's first token
            key_rank = torch.where(keys >= 0, (first[..., None] + keys).clamp(min=0), T + 1)  # (padding queries)
        # real token number r of row b sits at kv index kv_of_rank[b, r]; padding is written to a spare slot T and
        # slot T + 1 stays -1 for the list entries that attend nothing
        kv_of_rank = torch.full((B, T + 2), -1, dtype=torch.long, device=seg.device)
        kv_of_rank.scatter_(1, torch.where(real, rank, T), torch.arange(T, device=seg.device).expand(B, T))
        kv = kv_of_rank.gather(1, key_rank.flatten(1)).view(keys.shape)
        if layout.kv_offset:  # keys before the ones handed to attention are not attended
            kv = torch.where(kv >= layout.kv_offset, kv - layout.kv_offset, -1)
        count = torch.where(layout.q_seg() >= 0, count, 0)  # padding queries attend nothing (their list is unread)
        layout.cache[key] = (kv.to(torch.int32), count.to(torch.int32))
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
