"""The plain PyTorch reference: a dense keep mask from a layout and a pattern, and explicit attention over it.

Every fast path is tested against :func:`reference_attention` (in float64 on the CPU, in fp32 and low precision on
the GPU); :func:`layout_keep` is also the mask of the dense-mask SDPA path and of the general gathered decode.
"""

from __future__ import annotations

import math

import torch

from ..layout import PPALayout, running_count
from ..pattern import PPAPattern


def layout_keep(layout: PPALayout, pattern: PPAPattern, max_distance: int | None = None) -> torch.Tensor:
    """``[B, 1, Q, K]`` bool: the pattern applied to a layout (same sequence, real keys, the pattern's predicate).

    Cached on the layout, so the layers of one forward pass that share a pattern build it once.
    """
    def build():
        if layout.one_sequence_per_row:
            keep, q_real = keep_of_any_query(layout, pattern, max_distance)
            return keep & q_real
        seg, pos = layout.seg, layout.pos
        keys = slice(layout.kv_offset, layout.kv_offset + layout.kv_length)
        q_seg, k_seg = layout.at_queries(seg)[:, :, None], seg[:, None, keys]
        ok = pattern.keep(layout.at_queries(pos)[:, :, None], pos[:, None, keys], length=seg.shape[-1],
                          max_distance=max_distance)
        return (ok & (q_seg == k_seg) & (k_seg >= 0))[:, None]

    return layout.per_forward(("keep", pattern.key, max_distance), build)


def keep_of_any_query(layout: PPALayout, pattern: PPAPattern, max_distance: int | None = None):
    """For a layout whose rows each hold one sequence (``layout.one_sequence_per_row``): ``(keep [B, 1, Q, K] bool,
    q_real [B, 1, Q, 1] bool)``, where ``keep`` is :func:`layout_keep` as if every query were a real token (the
    pattern and the real keys) and ``q_real`` marks the real ones: ``keep & q_real`` is :func:`layout_keep`.

    Same sequence = both real, and a real token's position is its rank among its row's real tokens: fewer operations
    than ``seg`` and ``pos`` (this runs once per decoding step); padding's rank only reaches rows and columns that
    ``q_real`` and the real keys mask out."""
    def build():
        valid = layout.valid
        keys = slice(layout.kv_offset, layout.kv_offset + layout.kv_length)
        pos = running_count(valid) - 1
        ok = pattern.keep(layout.at_queries(pos)[:, :, None], pos[:, None, keys], length=valid.shape[-1],
                          max_distance=max_distance)
        return (ok & valid[:, None, keys])[:, None], layout.at_queries(valid)[:, None, :, None]

    return layout.per_forward(("keep_of_any_query", pattern.key, max_distance), build)


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, Hkv, K, D]`` -> ``[B, Hkv * groups, K, D]``, query head ``h`` reading KV head ``h // groups``
    (the same as ``repeat_interleave(groups, dim=1)``, as one copy)."""
    if groups == 1:
        return x
    B, H, K, D = x.shape
    return x[:, :, None].expand(B, H, groups, K, D).reshape(B, H * groups, K, D)


def reference_attention(query, key, value, keep: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Explicit ``softmax(q k^T * scale + mask) v`` in the inputs' dtype (softmax in float32 or wider).

    ``query [B, H, Q, D]``, ``key``/``value [B, Hkv, K, D]``, ``keep``: bool, broadcastable to ``[B, H, Q, K]``.
    Returns ``[B, H, Q, D]``; rows with no kept key return zeros.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = expand_kv(key, groups), expand_kv(value, groups)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    acc = torch.promote_types(scores.dtype, torch.float32)
    scores = scores.to(acc).masked_fill(~keep, float("-inf"))
    row_any = keep.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~row_any, 0.0), dim=-1) * row_any
    return torch.matmul(probs.to(value.dtype), value)
