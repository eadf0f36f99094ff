"""FlexAttention path: a BlockMask built from the pattern's tables (or from :meth:`PPAPattern.keep` over a layout),
never an ``L x L`` tensor on CUDA. Compiled on CUDA; on CPU eager and forward only (FlexAttention has no CPU
backward)."""

from __future__ import annotations

import numpy as np
import torch

from ..cache import BoundedCache
from ..layout import PPALayout
from ..pattern import PPAPattern
from .tiles import FULL, PARTIAL, TOKEN_PARTIAL, tile_classes

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    BlockMask = create_block_mask = flex_attention = None

_FLEX = BoundedCache("flex", 64)


def flex_available() -> bool:
    return flex_attention is not None


def _flex_fn(device: torch.device):
    # Compiled on CUDA (fused kernel); eager elsewhere (CPU: forward only, used for tests). dynamic=None: the first
    # shape is compiled static, and the first change of shape (a new batch length, padded prompts of another
    # length) recompiles once with dynamic sizes instead of once per length (dynamic=False hit the recompile
    # limit after 8 lengths and fell back to eager, unfused FlexAttention).
    if device.type != "cuda":
        return flex_attention
    return _FLEX.get("compiled", lambda: torch.compile(flex_attention, dynamic=None))


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
    """The BlockMask of any layout (padding, packed sequences), from :func:`layout_mask_mod`; cached on the layout
    (one per pattern per forward pass)."""
    B, _, Q, K = layout.shape
    return layout.per_forward(("flex", pattern.key, max_distance, block_size), lambda: create_block_mask(
        layout_mask_mod(layout, pattern, max_distance), B, None, Q, K, device=layout.device,
        BLOCK_SIZE=block_size, _compile=layout.device.type == "cuda"))


def _kv_blocks(classes: np.ndarray, kinds, device):
    sel = np.isin(classes, kinds)
    num = sel.sum(-1).astype(np.int32)
    # Selected block indices first (ascending), the rest after: a stable argsort of "not selected".
    order = np.argsort(~sel, axis=-1, kind="stable").astype(np.int32)
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)[None, None]  # noqa: E731
    return to(num), to(order)


@torch.compiler.disable
def single_sequence_block_mask(pattern: PPAPattern, q_len: int, kv_len: int, device, q_start: int | None = None,
                               k_start: int = 0, max_distance: int | None = None, block_size: int = 128):
    """The BlockMask of one unpadded sequence (shared by batch and heads), cached: built with
    ``BlockMask.from_kv_blocks`` from :func:`~ppa_hf.ops.tiles.tile_classes` (FULL tiles run without the mask_mod,
    PARTIAL ones with it, EMPTY ones are skipped), ``O(tiles)`` work.

    Host work in numpy, so torch.compile does not trace it (Dynamo would turn the numpy calls into CPU tensor ops,
    some of which do not exist, e.g. a boolean cumsum): a compiled caller runs it eagerly, at the cost of a graph
    break."""
    if q_start is None:
        q_start = kv_len - q_len + k_start

    def build():
        classes = tile_classes(pattern, q_len, kv_len, block_size, block_size, q_start, k_start, max_distance,
                               ragged_partial=False)  # FlexAttention masks the overhang itself
        kv_num, kv_idx = _kv_blocks(classes, (PARTIAL, TOKEN_PARTIAL), device)
        full_num, full_idx = _kv_blocks(classes, (FULL,), device)
        tables = pattern.tables(max(q_start + q_len, k_start + kv_len, 1), device)
        qs, ks = int(q_start), int(k_start)

        def mask_mod(b, h, q_idx, kv_idx):
            return pattern.keep(q_idx + qs, kv_idx + ks, tables=tables, max_distance=max_distance)

        mask_mod.__name__ = f"{pattern.name}_analytic"
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                        mask_mod=mask_mod, seq_lengths=(q_len, kv_len))

    return _FLEX.get((pattern.key, q_len, kv_len, str(device), q_start, k_start, max_distance, block_size), build)


def flex_attention_ppa(query, key, value, block_mask, scale: float | None = None) -> torch.Tensor:
    """PPA through FlexAttention with ``block_mask`` (:func:`single_sequence_block_mask` or
    :func:`layout_block_mask`). ``query [B, H, Q, D]``, ``key``/``value [B, Hkv, K, D]`` -> ``[B, H, Q, D]``.
    Raises where FlexAttention cannot run: without it (torch < 2.5), or training on CPU."""
    if not flex_available():
        raise ValueError("ppa_backend='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention is missing)")
    if query.device.type == "cpu" and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        raise ValueError(
            "ppa_backend='flex' cannot train on CPU: FlexAttention has no CPU backward. "
            "Use ppa_backend='sdpa_mask' (exact, with gradients) or 'auto'."
        )
    gqa = query.shape[1] != key.shape[1]
    return _flex_fn(query.device)(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa)
