"""ppa_hf: Power-based Partial Attention (PPA) for Hugging Face Transformers.

``import ppa_hf`` registers ``attn_implementation="ppa"``::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="ppa", ppa_p=0.75)
    ppa_hf.apply(model, p=0.5, window=32, sink_tokens=4)   # or patch a loaded model

Layout: :mod:`ppa_hf.pattern` (the rule and its tables), :mod:`ppa_hf.layout` (token positions of a forward pass),
:mod:`ppa_hf.ops` (attention kernels, Transformers-free), :mod:`ppa_hf.hf` (settings, mask and attention interfaces,
registration: the only modules that import Transformers) and :mod:`ppa_hf.recipes` (training, evaluation, sweeps,
the demo: they need the extras).
"""

from .hf.register import ATTN_IMPLEMENTATION, apply, check_model, register
from .hf.settings import PPASettings, read_settings
from .layout import PPALayout
from .pattern import (
    PPAPattern,
    attended_keys,
    attended_keys_per_query,
    block_far_offsets,
    dense_mask,
    far_offsets,
    ppa_mask_mod,
    score_entries,
)

__version__ = "0.2.0"

register()

__all__ = [
    "ATTN_IMPLEMENTATION", "apply", "check_model", "register", "PPALayout", "PPAPattern", "PPASettings",
    "read_settings", "attended_keys", "attended_keys_per_query", "block_far_offsets", "dense_mask",
    "far_offsets", "ppa_mask_mod", "score_entries", "__version__",
]
