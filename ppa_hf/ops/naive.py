"""Dense-mask paths: the explicit reference and SDPA with a boolean mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..masking import PPALayout
from ..pattern import PPAPattern


def layout_keep(layout: PPALayout, pattern: PPAPattern, max_distance: int | None = None) -> torch.Tensor:
    """``[B, 1, Q, K]`` bool: the pattern applied to a layout (same sequence, real keys, PPA predicate).

    Cached on the layout, so the layers of one forward pass that share a pattern build it once.
    """
    key = ("dense", pattern, max_distance)
    if key not in layout.cache:
        q_seg, k_seg = layout.q_seg()[:, :, None], layout.k_seg()[:, None, :]
        ok = pattern.keep(layout.q_pos()[:, :, None], layout.k_pos()[:, None, :], length=layout.seg.shape[-1],
                          max_distance=max_distance)
        layout.cache[key] = (ok & (q_seg == k_seg) & (k_seg >= 0))[:, None]
    return layout.cache[key]


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, Hkv, K, D]`` -> ``[B, Hkv * groups, K, D]``, query head ``h`` reading KV head ``h // groups``
    (the same as ``repeat_interleave(groups, dim=1)``, as one copy)."""
    if groups == 1:
        return x
    B, H, K, D = x.shape
    return x[:, :, None].expand(B, H, groups, K, D).reshape(B, H * groups, K, D)


def reference_attention(query, key, value, keep: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Explicit ``softmax(q k^T * scale + mask) v`` in the inputs' dtype (softmax in float32 or wider).

    ``keep``: bool, broadcastable to ``[B, H, Q, K]``. Rows with no kept key return zeros.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = _expand_kv(key, groups), _expand_kv(value, groups)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    acc = torch.promote_types(scores.dtype, torch.float32)
    scores = scores.to(acc).masked_fill(~keep, float("-inf"))
    row_any = keep.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~row_any, 0.0), dim=-1) * row_any
    return torch.matmul(probs.to(value.dtype), value)


def naive_attention(query, key, value, layout: PPALayout, pattern: PPAPattern, scale: float | None = None,
                    dropout: float = 0.0, max_distance: int | None = None) -> torch.Tensor:
    """PPA through SDPA with a dense ``[B, 1, Q, K]`` boolean mask. Exact on any device, with gradients."""
    cache_key = ("sdpa_mask", pattern, max_distance)
    if cache_key not in layout.cache:  # shared by the layers of one forward pass
        keep = layout_keep(layout, pattern, max_distance)
        row_any = keep.any(-1, keepdim=True)
        # A row with no key would give NaN in SDPA; let it see everything, then zero it.
        layout.cache[cache_key] = (keep, None) if bool(row_any.all()) else (keep | ~row_any, row_any)
    attn_mask, row_any = layout.cache[cache_key]
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and query.shape[2] <= GQA_FOLD_MAX_QUERIES:
        out = _sdpa_groups_folded(query, key, value, attn_mask, groups, dropout, scale)
    else:
        if groups > 1 and query.device.type == "cuda":
            # CUDA's fused SDPA kernels take a mask or GQA, not both (torch then falls back to the unfused math
            # kernel): repeat the KV heads instead, as Transformers' own sdpa path does with a mask.
            key, value = _expand_kv(key, groups), _expand_kv(value, groups)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout,
                                             scale=scale, enable_gqa=query.shape[1] != key.shape[1])
    return out if row_any is None else out * row_any.to(out.dtype)


# Up to this many queries (decoding, short chunks) the query heads that share a KV head are folded into the
# query axis instead of repeating K and V per query head: the copy is then of the small queries and mask, not
# of the whole cache (at 50 sequences x 1k cached tokens the repeat copied about 230 MB per layer and step).
GQA_FOLD_MAX_QUERIES = 16


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
