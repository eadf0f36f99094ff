"""Decoding path: a few queries against a long KV cache read only their attended keys.

For each query the attended kv indices (``w + T**p`` of them, plus sinks) are listed from the same
predicate as every other path, then K and V rows are gathered and attention runs on those rows only.
"""

from __future__ import annotations

import math

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


def decode_attention(query, key, value, layout: PPALayout, pattern: PPAPattern, scale: float | None = None,
                     max_distance: int | None = None) -> torch.Tensor:
    """``query [B, H, Q, D]``, ``key``/``value [B, Hkv, K, D]`` -> ``[B, H, Q, D]``, reading ``N << K`` rows."""
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
