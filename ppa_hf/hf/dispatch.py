"""The ``"ppa"`` entry of Transformers' ``AttentionInterface``: one layer's attention call, and the one place that
chooses an attention path (:func:`choose_path`; under torch.compile :func:`compiled_path` first). Ops never
choose: an op that cannot serve its inputs raises."""

from __future__ import annotations

import functools

import torch

from ..layout import PPALayout
from ..ops import (decode_index, flex_attention_ppa, flex_available, gather_decode_attention, layout_block_mask,
                   sdpa_mask_attention, single_sequence_block_mask)
from .context_parallel import ContextParallelLayout
from .settings import PPASettings, read_settings

DECODE_MAX_QUERIES = 16  # "a few new queries": above this the gathered path stops paying
DECODE_MIN_KEYS = 1024  # below this (auto) the dense mask is as cheap as the index list
# Packed or left-padded rows go to a sparse kernel (FlexAttention or the unpacked Triton kernels) only above this many
# (query, key) entries per row: below it the dense-mask SDPA path is faster (H200, SmolLM2 shape, 50 left-padded
# prompts of 700-1000 tokens: 0.4-0.6 s prefill against 2.5 s for Flex, plus two Flex compilations of about 20 s;
# benchmarks/generation_profile.py).
SPARSE_MIN_ENTRIES = 4096 * 4096
# Up to this many queries (decoding, short chunks) the dense-mask path folds the GQA query heads into the query axis
# instead of repeating K and V per query head: the copy is then of the small queries and mask, not of the whole
# cache (at 50 sequences x 1k cached tokens the repeat copied about 230 MB per layer and step).
GQA_FOLD_MAX_QUERIES = 16

PATHS = ("sdpa_mask", "flex", "gather_decode", "triton", "triton_layout", "triton_decode")

_UNSUPPORTED_KWARGS = {
    "softcap": "attention logit soft-capping",
    "position_bias": "an additive position bias",
    "s_aux": "learned attention-sink logits",
    "sinks": "learned attention-sink logits",
}


@functools.cache
def _triton():
    """:mod:`ppa_hf.ops.triton`, imported on first use (importing Triton costs start-up time), then kept (this runs
    in every attention call)."""
    from ..ops import triton

    return triton


def _module_flag(module, name: str, default: bool):
    """``getattr(module, name, default)`` without ``nn.Module.__getattr__``'s slow miss (this runs in every call)."""
    own = vars(module)
    return own[name] if name in own else getattr(type(module), name, default)


def _refuse(module, is_causal, kwargs):
    name = type(module).__name__
    if _module_flag(module, "is_cross_attention", False):
        raise ValueError(f"attn_implementation='ppa' cannot run cross-attention ({name}); PPA is causal self-attention")
    if is_causal is False or _module_flag(module, "is_causal", True) is False:
        raise ValueError(f"attn_implementation='ppa' cannot run non-causal attention ({name}); PPA is causal")
    for key, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(key) is not None:
            raise ValueError(f"attn_implementation='ppa' does not support {what} ({key!r}, used by {name})")


def choose_path(settings: PPASettings, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                layout: PPALayout, dropout: float) -> str:
    """The one place that picks a path (one of :data:`PATHS`) for this call.

    An explicit ``ppa_backend`` is obeyed or refused with a ``ValueError``, never replaced by another path:

    * ``sdpa_mask``: the dense-mask SDPA path; ``flex``: FlexAttention; ``decode``: gathered decoding in torch
      (any number of queries);
    * ``triton``: the fused Triton decode kernel for up to ``DECODE_MAX_QUERIES`` queries (the full pattern included),
      the block-sparse Triton kernel otherwise: directly where every row is one sequence from kv index 0 (no left
      padding, no packing), on the sequences unpacked one per row elsewhere (``triton_layout``; keys from kv index 0).

    ``auto``: attention dropout -> ``sdpa_mask``; a few queries against at least ``DECODE_MIN_KEYS`` keys and ``p <
    1`` -> the Triton decode kernel on CUDA (float32 with exact dots), the torch gather where gradients are needed
    or Triton cannot run; other few-query calls -> ``sdpa_mask``; the block-sparse Triton kernel where it can run;
    packed or left-padded rows on CUDA above ``SPARSE_MIN_ENTRIES`` query-key pairs: the Triton kernels on the
    sequences unpacked one per row (keys from kv index 0), FlexAttention where Triton cannot run; else ``sdpa_mask``
    (exact, trains on CPU). With descriptor loads the Triton kernels are faster than FlexAttention, or within 1% of
    it, for both granularities at head sizes 64 and 128 (H100, 32k, p = 0.75, forward + backward: unpadded block
    pattern at 128, 8.24 against 8.73 ms; one row packed with 4 or 32 sequences, block at 128, 7.78 against 8.23 and
    6.12 against 6.04 ms, Triton faster elsewhere; docs/benchmarks.md).
    """
    backend = settings.backend
    if dropout > 0 and backend not in ("auto", "sdpa_mask"):
        raise ValueError(
            f"ppa_backend={backend!r} has no attention dropout (got dropout={dropout}); "
            "use ppa_backend='sdpa_mask' or 'auto', or set the model's attention dropout to 0"
        )
    q_len, kv_len = query.shape[2], key.shape[2]
    few_queries = q_len <= DECODE_MAX_QUERIES
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if backend == "sdpa_mask":
        return "sdpa_mask"
    if backend == "flex":
        if not flex_available():
            raise ValueError("ppa_backend='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention is missing)")
        return "flex"
    if backend == "decode":
        return "gather_decode"
    if backend == "triton":
        reason = _triton().unsupported_reason(query, key, value)
        rows = None if reason is not None or few_queries else layout.single_sequence_rows()
        if reason is None and not few_queries and rows is None and layout.kv_offset != 0:
            reason = (f"the block-sparse kernel needs the keys from kv index 0 when rows are padded on the left or "
                      f"packed (kv_offset={layout.kv_offset})")
        if reason is None and few_queries and needs_grad:
            reason = (f"{q_len} queries go to the decode kernel, which has no backward pass, and gradients are "
                      "required")
        if reason is not None:
            raise ValueError(f"ppa_backend='triton' cannot serve this call: {reason}; use ppa_backend='auto'")
        return "triton_decode" if few_queries else "triton" if rows is not None else "triton_layout"
    # auto
    if dropout > 0:
        return "sdpa_mask"
    if few_queries:
        if kv_len < DECODE_MIN_KEYS or settings.pattern.is_full:
            # a small dense mask; FlexAttention would recompile for every new cache length
            return "sdpa_mask"
        if needs_grad:  # the decode kernel has no backward pass; the torch gather has
            return "gather_decode"
        return "triton_decode" if _triton().supports(query, key, value) else "gather_decode"
    if _triton().supports(query, key, value) and layout.single_sequence_rows() is not None:
        return "triton"
    if _on_gpu(query) and q_len * kv_len > SPARSE_MIN_ENTRIES:  # packed or left-padded rows, many entries
        if layout.kv_offset == 0 and _triton().supports(query, key, value):
            return "triton_layout"
        if flex_available():
            return "flex"
    return "sdpa_mask"


def _on_gpu(query: torch.Tensor) -> bool:
    """Whether the sparse kernels for packed or left-padded rows are worth their set-up here (a seam for tests)."""
    return query.device.type == "cuda"


def common_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """``query``/``key``/``value`` in one dtype. Under autocast that is the autocast dtype, as SDPA would use: the
    rotary embedding leaves ``query``/``key`` in the fp32 of the weights while ``value`` comes out of an autocast
    linear in bf16, and the fused kernels need one dtype. Outside autocast a mismatch is promoted."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    elif query.dtype == key.dtype == value.dtype:
        return query, key, value
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def run_path(path: str, query, key, value, layout: PPALayout, settings: PPASettings, scale, dropout: float,
             max_distance) -> torch.Tensor:
    """Run ``path`` (from :func:`choose_path`): ``[B, H, Q, D]``."""
    pattern = settings.pattern
    if path in ("gather_decode", "triton_decode"):
        if path == "triton_decode" and layout.one_sequence_per_row and not torch.compiler.is_compiling():
            # eager: the index list in one launch instead of about 25 (compiled steps trace the torch version)
            index, count = _triton().triton_decode_index(layout, pattern, max_distance)
        else:
            index, count = decode_index(layout, pattern, max_distance)
        if path == "triton_decode":  # (choose_path has checked that the kernel takes these inputs)
            return _triton().triton_decode_attention(query, key, value, index, count, scale, check=False)
        return gather_decode_attention(query, key, value, index, count, scale)
    if path == "triton_layout":  # the layout is read on the host inside the op (one op for torch.compile)
        return _triton().triton_layout_attention(query, key, value, layout, pattern, max_distance, scale)
    if path == "sdpa_mask":
        fold = query.shape[2] <= GQA_FOLD_MAX_QUERIES
        return sdpa_mask_attention(query, key, value, layout, pattern, scale, dropout, max_distance, fold_gqa=fold)
    q_valid = None
    if path == "triton":
        q_start, k_start, q_valid = layout.single_sequence_rows()
        out = _triton().triton_ppa_attention(query, key, value, pattern, q_start, k_start, max_distance, scale)
    elif path == "flex":
        rows = layout.single_sequence_rows() if query.device.type == "cuda" else None
        if rows is not None:  # one sequence per row from kv index 0: the BlockMask comes from the tables
            q_start, k_start, q_valid = rows
            block_mask = single_sequence_block_mask(pattern, query.shape[2], key.shape[2], query.device, q_start,
                                                    k_start, max_distance)
        else:
            block_mask = layout_block_mask(layout, pattern, max_distance)
        out = flex_attention_ppa(query, key, value, block_mask, scale)
    else:
        raise ValueError(f"path={path!r} is not known; it must be one of {', '.join(PATHS)}")
    if q_valid is not None:  # right padding: padded queries return zeros, as on every path
        out = out * q_valid[:, None, :, None].to(out.dtype)
    return out


def _layer_settings(layout: PPALayout, module: torch.nn.Module) -> PPASettings:
    """:func:`read_settings` of the calling layer, read once per forward pass when every layer has the same settings
    (the layout lives for one forward pass; a config changed before the next one is read again)."""
    config = module.config
    if torch.compiler.is_compiling():  # traced once per layer; a memo on the layout would be a side effect to replay
        return read_settings(config, _module_flag(module, "layer_idx", None))
    key = ("settings", id(config))
    settings = layout.cache.get(key)
    if settings is None:
        settings = read_settings(config, _module_flag(module, "layer_idx", None))
        if not isinstance(vars(config).get("ppa_p"), (list, tuple)):  # one p for every layer
            layout.cache[key] = settings
    return settings


def compiled_path(settings: PPASettings, query, key, value, layout: PPALayout, dropout: float) -> str | None:
    """Under torch.compile, the path of a prefill or training call (more than ``DECODE_MAX_QUERIES`` queries) that
    needs no look at the layout on the host, so the call traces without a graph break; ``None`` elsewhere (decoding
    calls, which trace as they are, and calls that keep their host-side choice: FlexAttention, context parallelism,
    keys not from kv index 0, ``auto`` on CUDA where the Triton kernels cannot run).

    * ``sdpa_mask``: ``ppa_backend="sdpa_mask"``, attention dropout, and ``auto`` where Triton cannot run (what
      :func:`choose_path` gives there);
    * ``triton_layout``: ``auto`` and ``triton`` where Triton runs: one custom op that reads the layout inside
      (every row one sequence: the kernels as they are; packed or left-padded rows: unpacked one per row).

    The layout is then re-linked by the position ids without a branch (packed sequences that Transformers does not
    detect when a cache exists)."""
    if (not torch.compiler.is_compiling() or query.shape[2] <= DECODE_MAX_QUERIES
            or isinstance(layout, ContextParallelLayout)):
        return None
    backend = settings.backend
    if backend == "sdpa_mask" or (backend == "auto" and dropout > 0):
        return "sdpa_mask"
    if backend not in ("auto", "triton") or dropout > 0:
        return None  # flex; triton with dropout (choose_path refuses it)
    if _triton().supports(query, key, value):
        return "triton_layout" if layout.kv_offset == 0 else None
    return "sdpa_mask" if backend == "auto" and query.device.type != "cuda" else None


def ppa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs):
    """Transformers attention function. ``query [B, H, Q, D]``, ``key``/``value [B, Hkv, K, D]``; returns
    ``(output [B, Q, H, D], None)``. The PPA parameters come from ``module.config``."""
    _refuse(module, is_causal, kwargs)
    if not isinstance(attention_mask, PPALayout):
        raise ValueError(
            "attn_implementation='ppa' needs the PPA mask interface's layout, but got "
            f"{type(attention_mask).__name__}; pass a 2D padding mask (or none), not a prepared 4D mask"
        )
    settings = _layer_settings(attention_mask, module)
    query, key, value = common_dtype(query, key, value)  # (elementwise: the same before or after a gather)
    position_ids = kwargs.get("position_ids")
    traced = compiled_path(settings, query, key, value, attention_mask, dropout)
    if traced is not None:
        layout = attention_mask.linked_by_position_ids(position_ids)
    else:
        layout = attention_mask.with_position_ids(position_ids)
    if isinstance(layout, ContextParallelLayout):  # this rank holds one chunk of the sequence: gather all its keys
        key, value = layout.gather_kv(key, value)
    if key.shape[2] != layout.kv_length:
        raise ValueError(f"PPA layout covers {layout.kv_length} keys but attention got {key.shape[2]}")
    max_distance = kwargs.get("sliding_window")  # the model's own sliding window, intersected with PPA
    path = traced or choose_path(settings, query, key, value, layout, dropout)
    out = run_path(path, query, key, value, layout, settings, scaling, dropout, max_distance)
    return out.transpose(1, 2).contiguous(), None
