"""The Transformers-facing part of ppa_hf: settings on the model config, the mask and attention interfaces, and
registration. The only modules of the plugin that import Transformers."""

ATTN_IMPLEMENTATION = "ppa"  # the name registered with Transformers' attention and mask interfaces
