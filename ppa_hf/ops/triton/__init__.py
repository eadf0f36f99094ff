"""Triton kernels: block-sparse prefill / training (:mod:`.prefill`, and on packed or padded layouts
:mod:`.packed`), fused gathered decoding (:mod:`.decode`) and its index lists (:mod:`.decode_index`), and the code
they share (:mod:`.common`: tables on the device, the in-kernel predicate, supported shapes)."""

from .common import SUPPORTED_HEAD_DIMS, supports, triton_available, unsupported_reason
from .decode import triton_decode_attention
from .decode_index import triton_decode_index
from .packed import triton_layout_attention
from .prefill import triton_ppa_attention

__all__ = ["SUPPORTED_HEAD_DIMS", "supports", "triton_available", "unsupported_reason", "triton_decode_attention",
           "triton_decode_index", "triton_layout_attention", "triton_ppa_attention"]
