"""ppa_hf: Power-based Partial Attention (PPA) for Hugging Face Transformers.

``import ppa_hf`` registers ``attn_implementation="ppa"``::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="ppa", ppa_p=0.75)
    ppa_hf.apply(model, p=0.5, window=32, sink_tokens=4)   # or patch a loaded model

Layout: :mod:`ppa_hf.pattern` (the rule and its tables), :mod:`ppa_hf.layout` (token positions of a forward pass),
:mod:`ppa_hf.ops` (attention kernels, Transformers-free), :mod:`ppa_hf.hf` (settings, mask and attention interfaces,
registration: the only modules that import Transformers) and :mod:`ppa_hf.recipes` (training, evaluation, sweeps,
the demo: they need the extras).

Importing the package imports neither torch nor Transformers (the command line starts fast): the names below are
loaded on first use, and ``"ppa"`` is registered as soon as Transformers is imported (at once if it already is).
"""

import importlib

from .hf.register import register_when_transformers_loads

__version__ = "0.2.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "ATTN_IMPLEMENTATION": "ppa_hf.hf",
    "apply": "ppa_hf.hf.register",
    "check_model": "ppa_hf.hf.register",
    "register": "ppa_hf.hf.register",
    "PPASettings": "ppa_hf.hf.settings",
    "read_settings": "ppa_hf.hf.settings",
    "PPALayout": "ppa_hf.layout",
    **{name: "ppa_hf.pattern" for name in ("PPAPattern", "attended_keys", "attended_keys_per_query",
                                           "block_far_offsets", "dense_mask", "far_offsets", "ppa_mask_mod",
                                           "score_entries")},
}
_SUBPACKAGES = ("cache", "hf", "layout", "models", "ops", "pattern", "recipes")

__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBPACKAGES:  # ppa_hf.ops etc. without importing them first, as when the package imported them
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))


register_when_transformers_loads()
