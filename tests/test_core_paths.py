"""Every attention path against the explicit reference: awkward shapes, GQA, padding, q_len != kv_len,
fp32 and bf16, forward and gradients. Tolerance rule (FlashAttention): the fast path's error against an
fp64/fp32 reference is at most 2x (3x for gradients) the error of the reference itself run in bf16."""

import pytest
import torch
from transformers.masking_utils import causal_mask_function

from ppa_hf.hf.mask import ppa_mask_interface
from ppa_hf.layout import PPALayout
from ppa_hf.ops import (decode_index, flex_attention_ppa, gather_decode_attention, layout_block_mask, layout_keep,
                        reference_attention, sdpa_mask_attention)
from ppa_hf.ops.sdpa_mask import sdpa_mask
from ppa_hf.pattern import PPAPattern, dense_mask


def sdpa_mask_path(q, k, v, layout, pattern):
    return sdpa_mask_attention(q, k, v, layout, pattern)


def sdpa_mask_folded_path(q, k, v, layout, pattern):
    return sdpa_mask_attention(q, k, v, layout, pattern, fold_gqa=True)


def gather_decode_path(q, k, v, layout, pattern):
    return gather_decode_attention(q, k, v, *decode_index(layout, pattern))


def flex_path(q, k, v, layout, pattern):
    return flex_attention_ppa(q, k, v, layout_block_mask(layout, pattern))


EXACT_PATHS = [("sdpa_mask", sdpa_mask_path), ("sdpa_mask_folded", sdpa_mask_folded_path),
               ("gather_decode", gather_decode_path)]

PATTERNS = [
    PPAPattern(0.75, window=8, sink_tokens=0),
    PPAPattern(0.5, window=5, sink_tokens=3),
    PPAPattern(0.0, window=7, sink_tokens=1),
    PPAPattern(1.0, window=4, sink_tokens=0),
    PPAPattern(0.625, window=6, sink_tokens=2, granularity="block", block_size=16),
]


def make_layout(batch, q_len, kv_len, left_pad=(0,), right_pad=(0,)):
    mask = torch.ones(batch, kv_len, dtype=torch.bool)
    for b in range(batch):
        lp, rp = left_pad[b % len(left_pad)], right_pad[b % len(right_pad)]
        mask[b, :lp] = False
        if rp:
            mask[b, kv_len - rp :] = False
    return ppa_mask_interface(batch, q_len, kv_len, q_offset=kv_len - q_len, kv_offset=0,
                              mask_function=causal_mask_function, attention_mask=mask), mask


def expected_keep(pattern, mask, q_len):
    """Independent expectation: per row, the dense mask of its real tokens placed at their kv indices."""
    B, K = mask.shape
    out = torch.zeros(B, 1, q_len, K, dtype=torch.bool)
    for b in range(B):
        idx = torch.nonzero(mask[b]).flatten()
        if idx.numel() == 0:
            continue
        dense = pattern.dense(idx.numel())
        full = torch.zeros(K, K, dtype=torch.bool)
        full[idx[:, None], idx[None, :]] = dense
        out[b, 0] = full[K - q_len :]
    return out


def qkv(B, H, Hkv, Q, K, D=16, dtype=torch.float64, requires_grad=False):
    q = torch.randn(B, H, Q, D, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(B, Hkv, K, D, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(B, Hkv, K, D, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


SHAPES = [  # (B, H, Hkv, Q, K, left_pad, right_pad)
    (2, 6, 2, 173, 173, (0, 37), (0,)),  # odd length, GQA, left padding
    (1, 4, 4, 97, 97, (0,), (0,)),  # MHA
    (3, 4, 1, 5, 301, (0, 11, 300), (0,)),  # a few queries against a cache; a row with one real token
    (2, 2, 2, 64, 130, (3,), (0, 20)),  # q_len != kv_len, right padding
    (2, 6, 2, 1, 257, (0, 100), (0,)),  # one query (decoding), GQA folded into the query axis, left padding
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.name)
def test_layout_keep_matches_independent_dense(shape, pattern):
    B, H, Hkv, Q, K, lp, rp = shape
    layout, mask = make_layout(B, Q, K, lp, rp)
    assert torch.equal(layout_keep(layout, pattern), expected_keep(pattern, mask, Q))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.name)
def test_paths_forward_and_gradients_fp64(shape, pattern):
    B, H, Hkv, Q, K, lp, rp = shape
    layout, mask = make_layout(B, Q, K, lp, rp)
    keep = expected_keep(pattern, mask, Q)
    q, k, v = qkv(B, H, Hkv, Q, K, requires_grad=True)
    grad_out = torch.randn(B, H, Q, q.shape[-1], dtype=torch.float64)
    ref = reference_attention(q, k, v, keep)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, fn in EXACT_PATHS:
        out = fn(q, k, v, layout, pattern)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10, msg=f"{name} forward")
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        for g, r, what in zip(grads, ref_grads, "qkv"):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10, msg=f"{name} d{what}")
    with torch.no_grad():  # FlexAttention has no CPU backward: forward here, gradients in tests/test_gpu*.py
        out = flex_path(q.float(), k.float(), v.float(), layout, pattern)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=2e-5, msg="flex forward")


def _err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


@pytest.mark.parametrize("pattern", PATTERNS[:2] + PATTERNS[-1:], ids=lambda p: p.name)
def test_bf16_tolerance_rule(pattern):
    B, H, Hkv, Q, K, lp, rp = SHAPES[0]
    layout, mask = make_layout(B, Q, K, lp, rp)
    keep = expected_keep(pattern, mask, Q)
    q, k, v = qkv(B, H, Hkv, Q, K, dtype=torch.float32)
    g = torch.randn(B, H, Q, q.shape[-1])

    def run(fn, dtype):
        args = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*args)
        grads = torch.autograd.grad(out, args, g.to(dtype))
        return out, grads

    ref32, ref32_g = run(lambda a, b, c: reference_attention(a, b, c, keep), torch.float32)
    ref16, ref16_g = run(lambda a, b, c: reference_attention(a, b, c, keep), torch.bfloat16)
    for name, fn in EXACT_PATHS:
        out, grads = run(lambda a, b, c: fn(a, b, c, layout, pattern), torch.bfloat16)
        e_fast, e_ref = _err(out, ref32), _err(ref16, ref32)
        print(f"{pattern.name} {name} fwd: fast err {e_fast:.3e}, bf16 reference err {e_ref:.3e}")
        assert e_fast <= 2 * e_ref, (name, e_fast, e_ref)
        for gf, gr16, gr32, what in zip(grads, ref16_g, ref32_g, "qkv"):
            e_fast, e_ref = _err(gf, gr32), _err(gr16, gr32)
            print(f"{pattern.name} {name} d{what}: fast err {e_fast:.3e}, bf16 reference err {e_ref:.3e}")
            assert e_fast <= 3 * e_ref, (name, what, e_fast, e_ref)
    with torch.no_grad():
        out = flex_path(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, pattern)
    e_fast, e_ref = _err(out, ref32), _err(ref16, ref32)
    print(f"{pattern.name} flex fwd: fast err {e_fast:.3e}, bf16 reference err {e_ref:.3e}")
    assert e_fast <= 2 * e_ref


def test_padding_queries_output_zero_and_no_nan():
    layout, mask = make_layout(2, 40, 40, (0, 10))
    q, k, v = qkv(2, 2, 2, 40, 40, requires_grad=True)
    for _, fn in EXACT_PATHS:
        out = fn(q, k, v, layout, PPAPattern(0.5, 4))
        assert torch.isfinite(out).all()
        assert out[1, :, :10].abs().max() == 0
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        q.grad = k.grad = v.grad = None


def test_sinks_are_never_padding():
    pattern = PPAPattern(0.0, window=3, sink_tokens=2)
    layout, mask = make_layout(1, 20, 20, (5,))
    keep = layout_keep(layout, pattern)[0, 0]
    assert not keep[:, :5].any()  # padded slots are never sinks
    assert keep[19, 5] and keep[19, 6] and not keep[19, 7]  # the first two real tokens are


def test_max_distance_intersects():
    pattern = PPAPattern(1.0, window=4)
    layout, _ = make_layout(1, 50, 50)
    keep = layout_keep(layout, pattern, max_distance=10)[0, 0]
    assert torch.equal(keep, dense_mask(50, 0.0, 10))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.name)
@pytest.mark.parametrize("max_distance", [None, 1, 6])
def test_dense_mask_of_one_sequence_rows_equals_the_general_rule(shape, pattern, max_distance):
    """The dense-mask path's shortcut for rows of one sequence each (a row has a key iff its query is real) gives
    the general rule's mask (a row without a kept key sees everything) and row flags, and a layout that lists its
    queries by index gives the same as one that holds them as a slice."""
    B, H, Hkv, Q, K, lp, rp = shape
    layout, _ = make_layout(B, Q, K, lp, rp)
    assert layout.one_sequence_per_row and layout.q_slice is not None
    attn_mask, row_any = sdpa_mask(layout, pattern, max_distance)
    keep = layout_keep(layout, pattern, max_distance)
    general_any = keep.any(-1, keepdim=True)
    assert torch.equal(row_any, general_any)
    assert torch.equal(attn_mask, keep | ~general_any)
    by_index = PPALayout(None, None, torch.arange(K - Q, K), 0, K, one_sequence_per_row=True, valid=layout.valid)
    assert torch.equal(layout_keep(by_index, pattern, max_distance), keep)
    assert torch.equal(sdpa_mask(by_index, pattern, max_distance)[0], attn_mask)
    assert torch.equal(by_index.q_pos(), layout.q_pos()) and torch.equal(layout.q_index, by_index.q_index)


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.name)
def test_dense_mask_with_keys_from_a_kv_offset(pattern):
    """Keys handed to attention from kv index ``kv_offset`` on (a cache that dropped its oldest keys): the mask is
    the columns of the whole layout's mask from that index, through the shortcut and the general rule alike."""
    B, Q, T, k0 = 3, 4, 90, 7
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :30] = False
    mask[2, -2:] = False  # the last two queries of this row are padding
    whole = ppa_mask_interface(B, Q, T, q_offset=T - Q, kv_offset=0, attention_mask=mask)
    cut = ppa_mask_interface(B, Q, T - k0, q_offset=T - Q, kv_offset=k0, attention_mask=mask)
    for max_distance in (None, 3, 50):
        attn_mask, row_any = sdpa_mask(cut, pattern, max_distance)
        keep = layout_keep(cut, pattern, max_distance)
        assert torch.equal(keep, layout_keep(whole, pattern, max_distance)[..., k0:])
        assert torch.equal(row_any, keep.any(-1, keepdim=True))
        assert torch.equal(attn_mask, keep | ~row_any)


def test_dense_mask_path_zeroes_rows_only_where_a_query_has_no_key():
    """On the CPU the row scale is read once per forward pass: left out when every query attends a key (decoding),
    kept where a padding query must return zeros."""
    pattern = PPAPattern(0.75, window=4)
    q, k, v = qkv(2, 4, 2, 1, 40)
    layout, mask = make_layout(2, 1, 40, (0, 10))  # one new query per row, both real
    out = sdpa_mask_attention(q, k, v, layout, pattern, fold_gqa=True)
    scales = [entry[1] for key, entry in layout.cache.items() if key[0] == "bias"]
    assert scales == [None]
    torch.testing.assert_close(out, reference_attention(q, k, v, expected_keep(pattern, mask, 1)))
    layout, mask = make_layout(2, 1, 40, (0,), (0, 1))  # the second row's query is padding
    out = sdpa_mask_attention(q, k, v, layout, pattern, fold_gqa=True)
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0
    torch.testing.assert_close(out, reference_attention(q, k, v, expected_keep(pattern, mask, 1)))


def test_decode_reads_only_attended_keys():
    pattern = PPAPattern(0.75, window=64)
    layout, _ = make_layout(1, 1, 32768)
    index, count = decode_index(layout, pattern)
    n = int(count)
    assert n == 64 + int(32767**0.75) - int(63**0.75)  # spec's closed form, query at position 32767
    assert int((index >= 0).sum()) == n and index.shape[-1] < 32768 / 10


def test_decode_index_left_padded_rows_and_padding_queries():
    pattern = PPAPattern(0.5, window=4, sink_tokens=2)
    layout, mask = make_layout(3, 3, 300, (0, 120, 299))  # the last row's only real token is the last query
    index, count = decode_index(layout, pattern)
    keep = expected_keep(pattern, mask, 3)[:, 0]
    for b in range(3):
        for i in range(3):
            got = index[b, i, : count[b, i]]
            assert sorted(got[got >= 0].tolist()) == torch.nonzero(keep[b, i]).flatten().tolist()
    assert count[2, 0] == 0 and count[2, 1] == 0  # padding queries attend nothing
    assert int((index[2, 2] >= 0).sum()) == 1  # a row's first real token attends itself only


def test_triton_dot_precision_is_exact_for_float32_unless_tf32_is_allowed():
    """The Triton kernels' dots: exact IEEE products for float32 inputs, tf32 only where the user allowed it for
    float32 matmuls; half precision keeps Triton's default."""
    from ppa_hf.ops.triton.common import dot_precision

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        assert dot_precision(torch.bfloat16) == dot_precision(torch.float16) == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("pattern", [PPAPattern(0.75, window=8, sink_tokens=1),
                                     PPAPattern(0.75, window=8, granularity="block", block_size=16)],
                         ids=lambda p: p.name)
def test_triton_tables_are_made_once_per_table_size(pattern):
    """The kernels' int8 tables: the pattern's tables for every position below the length, kept per table size, so
    the decoding steps of one run (a new length each) reuse them instead of casting them again."""
    from ppa_hf.ops.triton.common import pattern_tables

    first = pattern_tables(pattern, 1000, "cpu")
    tok, blk = pattern.tables(1001, "cpu")
    assert torch.equal(first[0], tok.to(torch.int8))
    assert torch.equal(first[1], blk.to(torch.int8) if blk is not None else torch.ones(1, dtype=torch.int8))
    for length in (1001, 1002, 1005):  # later decoding steps, inside the same powers of two
        again = pattern_tables(pattern, length, "cpu")
        assert again[0] is first[0] and again[1] is first[1]
    longer = pattern_tables(pattern, 5000, "cpu")
    assert longer[0] is not first[0] and longer[0].numel() > 5000
    assert torch.equal(longer[0][: first[0].numel()], first[0])
