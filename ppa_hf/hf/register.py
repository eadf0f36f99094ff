"""Registration with Transformers and patching of loaded models."""

from __future__ import annotations

from transformers import AttentionInterface, PreTrainedConfig
from transformers.masking_utils import AttentionMaskInterface

from .dispatch import ppa_attention_forward
from .mask import ppa_mask_interface
from .settings import FIELDS, write_settings

ATTN_IMPLEMENTATION = "ppa"


def register() -> None:
    """Register ``"ppa"`` with ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent).

    Also declares the ``ppa_*`` names on ``PreTrainedConfig`` (class-level ``None``), only so that
    ``from_pretrained(..., ppa_p=0.75)`` routes those keyword arguments into the model's config instead of
    its ``__init__``. Values always live on each config instance; ``None`` means "not set".
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, ppa_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ppa_mask_interface)
    for name in FIELDS:
        if not hasattr(PreTrainedConfig, name):
            setattr(PreTrainedConfig, name, None)


def _attention_modules(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "is_causal") and hasattr(m, "config")]


def check_model(model) -> None:
    """Raise ``ValueError`` for models whose attention cannot take PPA (encoder-decoders, encoders,
    cross-attention)."""
    config = model.config
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; PPA supports decoder-only causal self-attention")
    if getattr(config, "is_causal", True) is False:
        raise ValueError(f"{name} is configured as non-causal (config.is_causal=False); PPA is causal")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{name} has no attention module that Transformers' AttentionInterface drives")
    bad = [n for n, m in modules if not m.is_causal or getattr(m, "is_cross_attention", False)]
    if bad:
        raise ValueError(
            f"{name} has non-causal or cross-attention modules ({', '.join(bad[:4])}{'...' if len(bad) > 4 else ''});"
            " PPA supports causal self-attention only"
        )


def apply(model, p, window: int = 64, sink_tokens: int = 0, backend: str = "auto", granularity: str = "token",
          block_size: int = 128):
    """Switch a loaded causal LM to PPA in place and return it.

    Args:
        model: a Transformers ``PreTrainedModel`` (decoder-only, causal).
        p: power in [0, 1], or a list with one value per layer (1 = full attention for that layer).
        window: local window ``w`` (the query itself included), integer >= 1.
        sink_tokens: the first ``s`` real tokens of each sequence are always attended, integer >= 0.
        backend: ``auto`` | ``sdpa_mask`` | ``flex`` | ``decode`` | ``triton`` (see
            :func:`ppa_hf.hf.dispatch.choose_path`).
        granularity: ``token`` (the paper's pattern) or ``block``.
        block_size: block size of the block-granular pattern.
    """
    check_model(model)
    write_settings(model.config, p, window, sink_tokens, backend, granularity, block_size)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model
