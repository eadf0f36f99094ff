"""Registration with Transformers and patching of loaded models.

This module imports neither torch nor Transformers when it is imported: ``import ppa_hf`` stays light (``ppa-hf
--help`` starts fast) and registers ``"ppa"`` as soon as Transformers is imported, or at once if it already is.
"""

from __future__ import annotations

import importlib.abc
import sys

from . import ATTN_IMPLEMENTATION


def register() -> None:
    """Register ``"ppa"`` with ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent).

    Also declares the ``ppa_*`` names on ``PreTrainedConfig`` as :class:`~ppa_hf.hf.settings.ConfigSetting`
    descriptors: ``from_pretrained(..., ppa_p=0.75)`` then routes those keyword arguments into the model's config
    (Transformers does so only for names the config has), every value is validated when it is set, and a config
    that carries PPA settings but names no attention runs PPA. Values always live on each config instance.
    """
    from transformers import AttentionInterface, PreTrainedConfig
    from transformers.masking_utils import AttentionMaskInterface

    from .dispatch import ppa_attention_forward
    from .mask import ppa_mask_interface
    from .settings import FIELDS, ConfigSetting

    AttentionInterface.register(ATTN_IMPLEMENTATION, ppa_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ppa_mask_interface)
    for name in FIELDS:
        if not isinstance(vars(PreTrainedConfig).get(name), ConfigSetting):
            setattr(PreTrainedConfig, name, ConfigSetting(name))


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Calls :func:`register` once Transformers has been imported.

    It finds no module itself: for the watched names it asks the other finders and wraps the found loader's
    ``exec_module``. ``ppa_hf.hf.mask`` is watched too because it imports Transformers at its top: when that import
    is the first one, registering must wait until ``mask`` itself has finished loading (it provides the mask
    interface).
    """

    WATCHED = ("transformers", "ppa_hf.hf.mask")

    def __init__(self):
        self.loading: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            self.loading.add(fullname)
            try:
                exec_module(module)
            finally:
                self.loading.discard(fullname)
            if "transformers" in sys.modules and not self.loading:
                self.uninstall()
                register()

        spec.loader.exec_module = exec_then_register  # this module's own loader object only
        return spec

    def uninstall(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def register_when_transformers_loads() -> None:
    """:func:`register` now if Transformers is imported, else as soon as it is (what ``import ppa_hf`` does)."""
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def _attention_modules(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "is_causal") and hasattr(m, "config")]


def check_model(model) -> None:
    """Raise ``ValueError`` for models whose attention cannot take PPA (encoder-decoders, encoders,
    cross-attention)."""
    from .settings import check_causal_config

    check_causal_config(model.config)
    name = type(model).__name__
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
    from .settings import follow_settings, write_settings

    check_model(model)
    write_settings(model.config, p, window, sink_tokens, backend, granularity, block_size)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    follow_settings(model.config)  # config.json records attn_implementation="ppa"
    return model
