"""Triton kernels: block-sparse prefill / training (:mod:`.prefill`), fused gathered decoding (:mod:`.decode`), and
the code they share (:mod:`.common`: tables on the device, the in-kernel predicate, supported shapes)."""

from .common import SUPPORTED_HEAD_DIMS, supports, triton_available, unsupported_reason
from .decode import triton_decode_attention
from .prefill import triton_ppa_attention

__all__ = ["SUPPORTED_HEAD_DIMS", "supports", "triton_available", "unsupported_reason", "triton_decode_attention",
           "triton_ppa_attention"]
