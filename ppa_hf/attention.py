"""The ``"ppa"`` entry of Transformers' ``AttentionInterface``: one layer's attention call."""

from __future__ import annotations

import torch

from .masking import PPALayout
from .ops import decode_attention, flex_attention_ppa, flex_available, naive_attention
from .settings import PPASettings, read_settings

DECODE_MAX_QUERIES = 16  # "a few new queries": above this the gathered path stops paying
DECODE_MIN_KEYS = 1024  # below this the dense mask is as cheap as the index list

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


def choose_backend(settings: PPASettings, query: torch.Tensor, key: torch.Tensor, layout: PPALayout,
                   dropout: float) -> str:
    """The path for this call: the configured ``ppa_backend``, or for ``auto``: gathered decoding for a few
    queries against a long cache, FlexAttention on CUDA, else the dense-mask SDPA path (exact, trains on CPU)."""
    if settings.backend != "auto":
        if dropout > 0 and settings.backend != "naive":
            raise ValueError(
                f"ppa_backend={settings.backend!r} has no attention dropout (got dropout={dropout}); "
                "use ppa_backend='naive' or 'auto', or set the model's attention dropout to 0"
            )
        return settings.backend
    q_len, kv_len = query.shape[2], key.shape[2]
    if dropout > 0:
        return "naive"
    if q_len <= DECODE_MAX_QUERIES and kv_len >= DECODE_MIN_KEYS and not settings.pattern.is_full:
        return "decode"
    if query.device.type == "cuda" and flex_available():
        return "flex"
    return "naive"


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
    backend = choose_backend(settings, query, key, layout, dropout)
    if backend == "decode":
        out = decode_attention(query, key, value, layout, pattern, scaling, max_distance)
    elif backend == "flex":
        out = flex_attention_ppa(query, key, value, layout, pattern, scaling, max_distance)
    else:
        out = naive_attention(query, key, value, layout, pattern, scaling, dropout, max_distance)
    return out.transpose(1, 2).contiguous(), None
