"""The ``"ppa"`` entry of Transformers' ``AttentionInterface``: one layer's attention call."""

from __future__ import annotations

import torch

from .masking import PPALayout
from .ops import decode_attention, flex_attention_ppa, flex_available, naive_attention
from .ops import triton_attention as _tri
from .ops.block_sparse import simple_layout
from .settings import PPASettings, read_settings

DECODE_MAX_QUERIES = 16  # "a few new queries": above this the gathered path stops paying
DECODE_MIN_KEYS = 1024  # below this the dense mask is as cheap as the index list
# FlexAttention only above this many (query, key) entries per row: below it the dense-mask SDPA path is faster
# (H200, SmolLM2 shape, 50 left-padded prompts of 700-1000 tokens: 0.4-0.6 s prefill against 2.5 s for Flex,
# plus two Flex compilations of about 20 s; benchmarks/generation_profile.py).
FLEX_MIN_ENTRIES = 4096 * 4096

_UNSUPPORTED_KWARGS = {
    "softcap": "attention logit soft-capping",
    "position_bias": "an additive position bias",
    "s_aux": "learned attention-sink logits",
    "sinks": "learned attention-sink logits",
}


def _refuse(module, is_causal, kwargs):
    name = type(module).__name__
    if getattr(module, "is_cross_attention", False):
        raise ValueError(f"attn_implementation='ppa' cannot run cross-attention ({name}); PPA is causal self-attention")
    if is_causal is False or getattr(module, "is_causal", True) is False:
        raise ValueError(f"attn_implementation='ppa' cannot run non-causal attention ({name}); PPA is causal")
    for key, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(key) is not None:
            raise ValueError(f"attn_implementation='ppa' does not support {what} ({key!r}, used by {name})")


def choose_backend(settings: PPASettings, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   layout: PPALayout, dropout: float) -> str:
    """The path for this call. An explicit ``ppa_backend`` is obeyed or refused with a ``ValueError``; for ``auto``:
    gathered decoding for a few queries against a long cache (a fused Triton kernel on CUDA), the dense-mask
    path for a few queries against a short cache or under full attention, the block-sparse
    Triton kernel on CUDA when every row is one sequence from kv index 0 (no or right padding) and the head size
    is supported, FlexAttention on CUDA otherwise for long inputs (more than ``FLEX_MIN_ENTRIES`` query-key
    pairs), else the dense-mask SDPA path (exact, trains on CPU).

    ``ppa_backend='triton'`` uses the Triton kernels: the fused decode kernel for a few queries against a long
    cache, the block-sparse kernel otherwise; a call the kernels cannot serve (no Triton for this device, left
    padding or packed sequences, an unsupported head size or dtype) raises instead of switching kernels."""
    if dropout > 0 and settings.backend not in ("auto", "naive"):
        raise ValueError(
            f"ppa_backend={settings.backend!r} has no attention dropout (got dropout={dropout}); "
            "use ppa_backend='naive' or 'auto', or set the model's attention dropout to 0"
        )
    if settings.backend not in ("auto", "triton"):
        return settings.backend
    q_len, kv_len = query.shape[2], key.shape[2]
    if dropout > 0:
        return "naive"
    if q_len <= DECODE_MAX_QUERIES and kv_len >= DECODE_MIN_KEYS and not settings.pattern.is_full:
        return "decode"
    if q_len <= DECODE_MAX_QUERIES and settings.backend == "auto":
        # A few queries against a short cache (or full attention): the dense mask is tiny. FlexAttention would
        # recompile for every new cache length (it is compiled for static shapes), so it is not used here.
        return "naive"
    triton_ok = _tri.supports(query, key, value)
    if triton_ok and simple_layout(layout) is not None:
        return "triton"
    if settings.backend == "triton":
        why = ("Triton cannot run these inputs here (device, dtype or head size "
               f"{query.shape[-1]} not supported)" if not triton_ok else
               "the block-sparse kernel needs every row to be one sequence starting at kv index 0 "
               "(no left padding, no packed sequences)")
        raise ValueError(f"ppa_backend='triton' cannot serve this call: {why}; use ppa_backend='auto'")
    if query.device.type == "cuda" and flex_available() and q_len * kv_len > FLEX_MIN_ENTRIES:
        return "flex"
    return "naive"


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


def ppa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs):
    """Transformers attention function. ``query [B, H, Q, D]``, ``key``/``value [B, Hkv, K, D]``;
    returns ``(output [B, Q, H, D], None)``. The PPA parameters come from ``module.config``."""
    _refuse(module, is_causal, kwargs)
    if not isinstance(attention_mask, PPALayout):
        raise ValueError(
            "attn_implementation='ppa' needs the PPA mask interface's layout, but got "
            f"{type(attention_mask).__name__}; pass a 2D padding mask (or none), not a prepared 4D mask"
        )
    settings = read_settings(module.config, getattr(module, "layer_idx", None))
    layout = attention_mask.with_position_ids(kwargs.get("position_ids"))
    if key.shape[2] != layout.kv_length:
        raise ValueError(f"PPA layout covers {layout.kv_length} keys but attention got {key.shape[2]}")
    max_distance = kwargs.get("sliding_window")  # the model's own sliding window, intersected with PPA
    pattern = settings.pattern
    query, key, value = common_dtype(query, key, value)
    backend = choose_backend(settings, query, key, value, layout, dropout)
    if backend == "decode":
        out = decode_attention(query, key, value, layout, pattern, scaling, max_distance)
    elif backend == "triton":
        q_start, k_start, q_valid = simple_layout(layout)
        out = _tri.triton_ppa_attention(query, key, value, pattern, q_start, k_start, max_distance, scaling)
        if q_valid is not None:  # right padding: padded queries return zeros, as on every path
            out = out * q_valid[:, None, :, None].to(out.dtype)
    elif backend == "flex":
        out = flex_attention_ppa(query, key, value, layout, pattern, scaling, max_distance)
    else:
        out = naive_attention(query, key, value, layout, pattern, scaling, dropout, max_distance)
    return out.transpose(1, 2).contiguous(), None
