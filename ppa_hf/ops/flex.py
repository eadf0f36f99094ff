"""FlexAttention path: a BlockMask built from :meth:`PPAPattern.keep`, never an ``L x L`` tensor on CUDA."""

from __future__ import annotations

import torch

from ..masking import PPALayout
from ..pattern import PPAPattern
from .block_sparse import pattern_block_mask, simple_layout

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    create_block_mask = flex_attention = None

_COMPILED = {}


def flex_available() -> bool:
    return flex_attention is not None


def _flex_fn(device: torch.device):
    # Compiled on CUDA (fused kernel); eager elsewhere (CPU: forward only, used for tests). dynamic=None: the first
    # shape is compiled static, and the first change of shape (a new batch length, padded prompts of another
    # length) recompiles once with dynamic sizes instead of once per length (dynamic=False hit the recompile
    # limit after 8 lengths and fell back to eager, unfused FlexAttention).
    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _COMPILED:
        _COMPILED["cuda"] = torch.compile(flex_attention, dynamic=None)
    return _COMPILED["cuda"]


def layout_mask_mod(layout: PPALayout, pattern: PPAPattern, max_distance: int | None = None):
    """FlexAttention ``mask_mod`` over a layout: local ``q_idx``/``kv_idx`` -> kv-axis indices -> positions."""
    seg, pos, q_index, kv_offset = layout.seg, layout.pos, layout.q_index, layout.kv_offset
    tables = pattern.tables(seg.shape[-1], seg.device)

    def mask_mod(b, h, q_idx, kv_idx):
        qa, ka = q_index[q_idx], kv_idx + kv_offset
        same = (seg[b, qa] == seg[b, ka]) & (seg[b, ka] >= 0)
        return same & pattern.keep(pos[b, qa], pos[b, ka], tables=tables, max_distance=max_distance)

    mask_mod.__name__ = f"{pattern.name}_layout"
    return mask_mod


def layout_block_mask(layout: PPALayout, pattern: PPAPattern, max_distance: int | None = None,
                      block_size: int = 128):
    """The BlockMask of a layout, cached on it (one per pattern per forward pass)."""
    key = ("flex", pattern, max_distance, block_size)
    if key not in layout.cache:
        B, _, Q, K = layout.shape
        layout.cache[key] = create_block_mask(
            layout_mask_mod(layout, pattern, max_distance), B, None, Q, K, device=layout.device,
            BLOCK_SIZE=block_size, _compile=layout.device.type == "cuda",
        )
    return layout.cache[key]


def flex_attention_ppa(query, key, value, layout: PPALayout, pattern: PPAPattern, scale: float | None = None,
                       max_distance: int | None = None) -> torch.Tensor:
    """PPA through FlexAttention. ``query [B, H, Q, D]``, ``key``/``value [B, Hkv, K, D]`` -> ``[B, H, Q, D]``."""
    if not flex_available():
        raise ValueError("ppa_backend='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention is missing)")
    if query.device.type == "cpu" and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        raise ValueError(
            "ppa_backend='flex' cannot train on CPU: FlexAttention has no CPU backward. "
            "Use ppa_backend='naive' (exact, with gradients) or 'auto'."
        )
    simple = simple_layout(layout) if query.device.type == "cuda" else None
    if simple is not None:
        # One sequence per row from kv index 0: the BlockMask comes analytically from the pattern's tables
        # (FULL / PARTIAL / EMPTY tiles, O(tiles) work), cached per (pattern, length, offsets, device).
        q_start, k_start, q_valid = simple
        block_mask = pattern_block_mask(pattern, query.shape[2], key.shape[2], query.device, q_start, k_start,
                                        max_distance)
    else:
        q_valid = None
        block_mask = layout_block_mask(layout, pattern, max_distance)
    gqa = query.shape[1] != key.shape[1]
    out = _flex_fn(query.device)(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    if q_valid is not None:  # right padding: padded queries return zeros, as on every path
        out = out * q_valid[:, None, :, None].to(out.dtype)
    return out
