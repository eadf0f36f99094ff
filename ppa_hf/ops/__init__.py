"""PPA attention ops. They import only :mod:`ppa_hf.pattern`, :mod:`ppa_hf.layout`, torch and triton: nothing here
knows Transformers, and none chooses another op: :func:`ppa_hf.hf.dispatch.choose_path` picks, an op that cannot
serve its inputs raises.

Each takes ``query [B, H, Q, D]``, ``key``/``value [B, Hkv, K, D]`` (``H % Hkv == 0``) and returns ``[B, H, Q, D]``:

* :func:`reference_attention` - explicit math on a dense mask (any dtype, float64 included): what tests compare with.
* :func:`sdpa_mask_attention` - a dense boolean mask + ``scaled_dot_product_attention``; exact, any device, forward
  and backward. The CPU training path.
* :func:`flex_attention_ppa` - FlexAttention with a BlockMask built from the pattern's tables (compiled on CUDA).
* :func:`gather_decode_attention` - a few queries against a long KV cache read only their attended keys (torch).
* :mod:`ppa_hf.ops.triton` - block-sparse prefill/training kernels and a fused gathered decode kernel.

Queries with no attended key (padding) return zeros on every path.
"""

from .flex import flex_attention_ppa, flex_available, layout_block_mask, single_sequence_block_mask
from .gather import decode_index, gather_decode_attention
from .reference import layout_keep, reference_attention
from .sdpa_mask import sdpa_mask_attention

__all__ = [
    "reference_attention", "layout_keep", "sdpa_mask_attention", "flex_attention_ppa", "flex_available",
    "layout_block_mask", "single_sequence_block_mask", "decode_index", "gather_decode_attention",
]
