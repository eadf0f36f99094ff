"""The dense-mask path: SDPA with a ``[B, 1, Q, K]`` boolean mask of the pattern. Exact on any device, with
gradients and attention dropout; the path that trains on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import PPALayout
from ..pattern import PPAPattern
from .reference import expand_kv, keep_of_any_query, layout_keep


def sdpa_mask(layout: PPALayout, pattern: PPAPattern, max_distance: int | None = None):
    """``(attn_mask [B, 1, Q, K] bool, row_any [B, 1, Q, 1] bool)`` for SDPA, cached on the layout (shared by the
    layers of one forward pass). A query with no key would give NaN in SDPA: its row lets it see everything and
    ``row_any`` zeroes its output afterwards (skipped only where reading that every row has a key costs no
    synchronisation: see :func:`sdpa_mask_attention`)."""
    def build():
        if layout.one_sequence_per_row and (max_distance is None or max_distance > 0):
            # a real query keeps its own key (every window holds offset 0), so a row has a key iff its query is real
            keep, q_real = keep_of_any_query(layout, pattern, max_distance)
            return keep | ~q_real, q_real
        keep = layout_keep(layout, pattern, max_distance)
        row_any = keep.any(-1, keepdim=True)
        return keep | ~row_any, row_any

    return layout.per_forward(("sdpa_mask", pattern.key, max_distance), build)


def sdpa_mask_attention(query, key, value, layout: PPALayout, pattern: PPAPattern, scale: float | None = None,
                        dropout: float = 0.0, max_distance: int | None = None, fold_gqa: bool = False):
    """PPA through SDPA with a dense boolean mask. ``query [B, H, Q, D]``, ``key``/``value [B, Hkv, K, D]`` ->
    ``[B, H, Q, D]``.

    GQA (``H > Hkv``): ``fold_gqa`` folds the query heads that share a KV head into the query axis (cheap for a few
    queries: the copy is of the queries and the mask, not of the cache); otherwise on CUDA the KV heads are repeated
    (CUDA's fused SDPA kernels take a mask or GQA, not both, as Transformers' own sdpa path also does), and
    elsewhere SDPA's ``enable_gqa`` is used."""
    groups = query.shape[1] // key.shape[1]
    fold = groups > 1 and fold_gqa
    dtype = query.dtype

    def build():  # SDPA turns a boolean mask into an additive one in every call; made once per forward pass instead
        attn_mask, row_any = sdpa_mask(layout, pattern, max_distance)
        row_scale = None if _every_row_known_to_attend(row_any) else row_any.to(dtype)
        return _additive(_fold_mask(attn_mask, groups) if fold else attn_mask, dtype), row_scale

    bias, row_scale = layout.per_forward(("bias", pattern.key, max_distance, groups if fold else 1, dtype), build)
    if fold:
        out = _sdpa_groups_folded(query, key, value, bias, groups, dropout, scale)
    else:
        if groups > 1 and query.device.type == "cuda":
            key, value = expand_kv(key, groups), expand_kv(value, groups)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout,
                                             scale=scale, enable_gqa=query.shape[1] != key.shape[1])
    return out if row_scale is None else out * row_scale


def _every_row_known_to_attend(row_any: torch.Tensor) -> bool:
    """Whether every query is known to attend a key, so no output needs zeroing: read where that costs no
    synchronisation (a CPU tensor, eager), assumed not elsewhere. Saves a multiplication per layer in decoding."""
    return row_any.device.type == "cpu" and not torch.compiler.is_compiling() and bool(row_any.all())


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: attend) as SDPA's additive form in ``dtype``: 0 where True, -inf where False (what
    SDPA computes from a boolean mask itself)."""
    return torch.full(mask.shape, float("-inf"), dtype=dtype, device=mask.device).masked_fill_(mask, 0.0)


def _fold_mask(attn_mask: torch.Tensor, groups: int) -> torch.Tensor:
    """``attn_mask [B, 1, Q, K]`` repeated for the ``groups`` query heads folded into the query axis:
    ``[B, 1, G*Q, K]`` (one query: ``[B, 1, 1, K]`` as it is, which broadcasts over the folded axis)."""
    B, _, Q, K = attn_mask.shape
    if Q == 1:
        return attn_mask
    return attn_mask[:, :, None].expand(B, 1, groups, Q, K).reshape(B, 1, groups * Q, K)


def _sdpa_groups_folded(query, key, value, mask, groups: int, dropout: float, scale) -> torch.Tensor:
    """GQA attention as plain multi-head SDPA over ``Hkv`` heads: ``query [B, Hkv*G, Q, D]`` becomes
    ``[B, Hkv, G*Q, D]`` (query head ``h`` reads KV head ``h // G``), with ``mask [B, 1, G*Q, K]`` (or
    ``[B, 1, 1, K]``) from :func:`_fold_mask`; returns ``[B, Hkv*G, Q, D]``."""
    B, H, Q, D = query.shape
    folded = query.reshape(B, key.shape[1], groups * Q, D)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, dropout_p=dropout, scale=scale)
    return out.reshape(B, H, Q, out.shape[-1])
