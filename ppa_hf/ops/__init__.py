"""PPA attention ops. Each takes ``query [B, H, Q, D]``, ``key``/``value [B, Hkv, K, D]`` (``H % Hkv == 0``,
GQA without repeating K/V where the op allows), a :class:`~ppa_hf.masking.PPALayout` and a
:class:`~ppa_hf.pattern.PPAPattern`, and returns ``[B, H, Q, D]``.

* :func:`reference_attention` - explicit math on a dense mask, for tests (any dtype, float64 included).
* :func:`naive_attention` - dense boolean mask + ``torch.nn.functional.scaled_dot_product_attention``; exact,
  any device, forward and backward. The CPU training path.
* :func:`flex_attention_ppa` - FlexAttention with a BlockMask built from the same predicate (compiled on CUDA).
* :func:`decode_attention` - gathers only the attended keys of a few queries against a long KV cache.

Queries with no attended key (padding) return zeros on every path.
"""

from .decode import decode_attention, gather_indices
from .flex import flex_attention_ppa, flex_available
from .naive import layout_keep, naive_attention, reference_attention

__all__ = [
    "reference_attention", "naive_attention", "layout_keep", "flex_attention_ppa", "flex_available",
    "decode_attention", "gather_indices",
]
