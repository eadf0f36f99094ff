"""The pattern module: exact offsets, counts, the predicate, block rule, mask pictures."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from ppa_hf import pattern as P


def exact_floor_pow(x: int, frac: Fraction) -> int:
    """floor(x**(a/b)) by integer arithmetic only: the largest n with n**b <= x**a (independent of the module)."""
    a, b = frac.numerator, frac.denominator
    target = x**a
    lo, hi = 0, x + 1
    while lo < hi:  # binary search for the largest n with n**b <= target
        mid = (lo + hi + 1) // 2
        if mid**b <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def brute_far_offsets(frac: Fraction, limit: int):
    return [d for d in range(1, limit) if exact_floor_pow(d, frac) > exact_floor_pow(d - 1, frac)]


@pytest.mark.parametrize("frac", [Fraction(1, 4), Fraction(1, 3), Fraction(1, 2), Fraction(5, 8), Fraction(3, 4),
                                  Fraction(7, 8)])
def test_far_offsets_exact(frac):
    limit = 5000
    assert P.far_offsets(float(frac), limit).tolist() == brute_far_offsets(frac, limit)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_p_one_over_k_gives_exact_kth_powers(k):
    limit = 200_000
    expected = [m**k for m in range(1, limit) if m**k < limit]
    assert P.far_offsets(1.0 / k, limit).tolist() == expected


def test_float_pow_would_be_wrong_for_one_third():
    # The trap the spec names: floor(64**(1/3)) is 3 in floating point, which would move offset 64 to 65.
    assert math.floor(64 ** (1 / 3)) == 3
    offsets = P.far_offsets(1 / 3, 130).tolist()
    assert 64 in offsets and 65 not in offsets


def test_spec_table():
    assert P.far_offsets(0.0, 1000).tolist() == []
    assert P.far_offsets(0.25, 300).tolist() == [1, 16, 81, 256]
    assert P.far_offsets(0.5, 30).tolist() == [1, 4, 9, 16, 25]
    assert P.far_offsets(0.75, 26).tolist() == [1, 3, 5, 7, 9, 11, 14, 16, 19, 22, 25]
    assert P.far_offsets(1.0, 10).tolist() == list(range(1, 10))


def test_generic_p_matches_high_precision_brute_force():
    p = 0.7123456  # no small fraction: decided with 60-digit logarithms
    from decimal import Decimal, getcontext

    getcontext().prec = 60
    dp = Decimal(p)

    def floor_pow(x):
        return 0 if x == 0 else int((dp * Decimal(x).ln()).exp())

    expected = [d for d in range(1, 3000) if floor_pow(d) > floor_pow(d - 1)]
    assert P.far_offsets(p, 3000).tolist() == expected


@pytest.mark.parametrize("p", [0.0, 0.25, 1 / 3, 0.5, 0.625, 0.75, 0.875, 1.0])
@pytest.mark.parametrize("window", [1, 7, 64])
def test_closed_form_key_count(p, window):
    for i in [window, window + 1, 100, 1000, 4097]:
        if i < window:
            continue
        floor_pow = (lambda x: 1 if p == 0 else exact_floor_pow(x, Fraction(p).limit_denominator(64)))
        far = 0 if p == 0 else floor_pow(i) - floor_pow(window - 1)
        assert P.attended_keys(i, p, window) == window + far
    counts = P.attended_keys_per_query(600, p, window)
    dense = P.dense_mask(600, p, window).sum(-1).numpy()
    assert (counts == dense).all()


@pytest.mark.parametrize("sinks", [1, 4, 16])
def test_counts_with_sinks_match_dense(sinks):
    counts = P.attended_keys_per_query(500, 0.5, 16, sinks)
    dense = P.dense_mask(500, 0.5, 16, sinks).sum(-1).numpy()
    assert (counts == dense).all()
    assert [P.attended_keys(i, 0.5, 16, sinks) for i in (0, 15, 16, 300, 499)] == counts[[0, 15, 16, 300, 499]].tolist()
    assert P.score_entries(500, 0.5, 16, sinks) == int(dense.sum())


def test_score_entries_scaling():
    # O(L^(1+p)): doubling L multiplies the far part by about 2^(1+p)
    w = 64
    for p in (0.5, 0.75):
        far = lambda L: P.score_entries(L, p, w) - w * L  # noqa: E731
        ratio = far(1 << 15) / far(1 << 14)
        assert abs(ratio - 2 ** (1 + p)) < 0.05 * 2 ** (1 + p)


def test_dense_mask_endpoints():
    L, w = 300, 17
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    assert torch.equal(P.dense_mask(L, 1.0, w), causal)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    assert torch.equal(P.dense_mask(L, 0.0, w), causal & (i - j < w))
    sink = P.dense_mask(L, 0.0, w, sink_tokens=3)
    assert torch.equal(sink, causal & ((i - j < w) | (j < 3)))


def test_dense_mask_with_kv_offset_is_the_bottom_rows():
    full = P.dense_mask(200, 0.6, 9, 2)
    assert torch.equal(P.dense_mask(5, 0.6, 9, 2, kv_length=200), full[-5:])


def test_block_rule():
    B = 16
    # p = 1: every block; p = 0: none
    assert P.block_far_offsets(1.0, B, 50).tolist() == list(range(1, 50))
    assert P.block_far_offsets(0.0, B, 50).tolist() == []
    # definition: db far iff floor((db*B)^p / B) > floor(((db-1)*B)^p / B), checked exactly
    frac = Fraction(3, 4)
    g = lambda db: exact_floor_pow(db * B, frac) // B  # noqa: E731  floor(floor(x)/B) == floor(x/B)
    expected = [db for db in range(1, 400) if g(db) > g(db - 1)]
    assert P.block_far_offsets(0.75, B, 400).tolist() == expected


def test_block_pattern_budget_close_to_token_pattern():
    L = 1 << 15
    for p in (0.5, 0.75, 0.875):
        token = P.PPAPattern(p, 64).dense  # noqa: F841
        far_token = len(P.far_offsets(p, L))
        far_block_keys = 128 * len(P.block_far_offsets(p, 128, L // 128))
        assert 0.5 < far_block_keys / far_token < 2.0, (p, far_block_keys, far_token)


def test_block_pattern_dense_semantics():
    pat = P.PPAPattern(0.5, window=5, sink_tokens=2, granularity="block", block_size=8)
    L = 160
    m = pat.dense(L)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    far_blocks = set(P.block_far_offsets(0.5, 8, L // 8 + 1).tolist())
    db = i // 8 - j // 8
    expect = (j <= i) & ((i - j < 5) | (db == 0) | torch.tensor(
        [[int(x) in far_blocks for x in row] for row in db.tolist()]) | (j < 2))
    assert torch.equal(m, expect)


def test_mask_mod_name_and_values():
    mod = P.ppa_mask_mod(0.75, 64, 4)
    assert mod.__name__ == "ppa_p0.75_w64_s4"
    q = torch.arange(300)[:, None]
    k = torch.arange(300)[None, :]
    assert torch.equal(mod(0, 0, q, k), P.dense_mask(300, 0.75, 64, 4))
    assert P.PPAPattern(0.5, 32, 0, "block", 64).name == "ppa_p0.5_w32_s0_block64"


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "abc", None, True, [0.5]])
def test_check_p_rejects(bad):
    with pytest.raises(ValueError, match=r"p=.*\[0, 1\]"):
        P.check_p(bad, "p")


def test_check_p_accepts_fraction_strings():
    assert P.check_p("1/3") == pytest.approx(1 / 3)
    assert P.far_offsets(P.check_p("1/3"), 130).tolist() == [1, 8, 27, 64, 125]


@pytest.mark.parametrize("value,ok", [(0, False), (1, True), (3.0, True), (3.5, False), ("4", False), (True, False)])
def test_check_int(value, ok):
    if ok:
        assert P.check_int(value, "window", 1) == int(value)
    else:
        with pytest.raises(ValueError, match="window="):
            P.check_int(value, "window", 1)


def test_mask_picture_cli(tmp_path):
    from ppa_hf.cli import main

    out = tmp_path / "mask.png"
    assert main(["mask", "--p", "0.75", "--length", "128", "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert main(["mask", "--p", "2", "--out", str(tmp_path / "bad.png")]) == 2
    assert not (tmp_path / "bad.png").exists()


def test_token_table_is_cached_and_long_enough():
    pattern = P.PPAPattern(0.75, 64)
    t1 = pattern.token_table(1000, "cpu")
    t2 = P.PPAPattern(0.75, 64).token_table(900, "cpu")  # an equal pattern shares the cached table
    assert t1 is t2 and t1.numel() >= 1000
    np.testing.assert_array_equal(t1[:1000].numpy(), P.offset_table(0.75, 64, 1000))
    np.testing.assert_array_equal(pattern.offsets(1000).numpy(), np.flatnonzero(t1.numpy()))


def test_block_tables_agree_with_block_rule():
    pattern = P.PPAPattern(0.75, 64, 0, "block", 32)
    table = pattern.block_table(4000).numpy()
    far = P.block_far_offsets(0.75, 32, table.size)
    assert table[0] and table[far].all() and table.sum() == far.size + 1
    np.testing.assert_array_equal(pattern.block_offsets(4000).numpy(), np.flatnonzero(table))
    assert not P.PPAPattern(0.75).block_table_np(8).any()  # token granularity: no block part
