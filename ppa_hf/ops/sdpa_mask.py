"""The dense-mask path: SDPA with a ``[B, 1, Q, K]`` boolean mask of the pattern. Exact on any device, with
gradients and attention dropout; the path that trains on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import PPALayout
from ..pattern import PPAPattern
from .reference import expand_kv, layout_keep


def sdpa_mask(layout: PPALayout, pattern: PPAPattern, max_distance: int | None = None):
    """``(attn_mask [B, 1, Q, K] bool, row_any [B, 1, Q, 1] bool)`` for SDPA, cached on the layout (shared by the
    layers of one forward pass). A query with no key would give NaN in SDPA: its row lets it see everything and
    ``row_any`` zeroes its output afterwards (always applied: checking first would synchronise)."""
    cache_key = ("sdpa_mask", pattern.key, max_distance)
    if cache_key not in layout.cache:
        keep = layout_keep(layout, pattern, max_distance)
        row_any = keep.any(-1, keepdim=True)
        layout.cache[cache_key] = (keep | ~row_any, row_any)
    return layout.cache[cache_key]


def sdpa_mask_attention(query, key, value, layout: PPALayout, pattern: PPAPattern, scale: float | None = None,
                        dropout: float = 0.0, max_distance: int | None = None, fold_gqa: bool = False):
    """PPA through SDPA with a dense boolean mask. ``query [B, H, Q, D]``, ``key``/``value [B, Hkv, K, D]`` ->
    ``[B, H, Q, D]``.

    GQA (``H > Hkv``): ``fold_gqa`` folds the query heads that share a KV head into the query axis (cheap for a few
    queries: the copy is of the queries and the mask, not of the cache); otherwise on CUDA the KV heads are repeated
    (CUDA's fused SDPA kernels take a mask or GQA, not both, as Transformers' own sdpa path also does), and
    elsewhere SDPA's ``enable_gqa`` is used."""
    attn_mask, row_any = sdpa_mask(layout, pattern, max_distance)
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and fold_gqa:
        out = _sdpa_groups_folded(query, key, value, attn_mask, groups, dropout, scale)
    else:
        if groups > 1 and query.device.type == "cuda":
            key, value = expand_kv(key, groups), expand_kv(value, groups)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout,
                                             scale=scale, enable_gqa=query.shape[1] != key.shape[1])
    return out * row_any.to(out.dtype)


def _sdpa_groups_folded(query, key, value, attn_mask, groups: int, dropout: float, scale) -> torch.Tensor:
    """GQA attention as plain multi-head SDPA over ``Hkv`` heads: ``query [B, Hkv*G, Q, D]`` becomes
    ``[B, Hkv, G*Q, D]`` (query head ``h`` reads KV head ``h // G``), ``attn_mask [B, 1, Q, K]`` is repeated
    for the ``G`` folded rows; returns ``[B, Hkv*G, Q, D]``."""
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    folded = query.reshape(B, Hkv, groups * Q, D)
    mask = attn_mask[:, :, None].expand(attn_mask.shape[0], 1, groups, Q, K).reshape(-1, 1, groups * Q, K)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, dropout_p=dropout, scale=scale)
    return out.reshape(B, H, Q, out.shape[-1])
