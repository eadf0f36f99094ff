"""CPU checks of what is derived from the pattern's tables: tile classes, BlockMask lists and the key lists of
gathered decoding must agree with the dense predicate PPAPattern.keep on awkward shapes."""

import numpy as np
import pytest
import torch

from ppa_hf.ops.tiles import EMPTY, FULL, PARTIAL, TOKEN_PARTIAL, csr_lists, device_lists, tile_classes
from ppa_hf.pattern import PPAPattern

PATTERNS = [PPAPattern(0.75), PPAPattern(0.5, 16, 3), PPAPattern(0.25, 8), PPAPattern(0.0, 20), PPAPattern(1.0),
            PPAPattern(0.875, 64), PPAPattern(0.75, 64, 0, "block", 32), PPAPattern(0.5, 16, 2, "block", 16),
            PPAPattern(0.875, 5, 0, "block", 64)]
SHAPES = [(1000, 1000, 32, 64, None), (777, 777, 64, 32, None), (300, 1001, 32, 32, None), (999, 999, 16, 16, 100)]


def _keep(pattern, q_len, kv_len, md):
    q = torch.arange(kv_len - q_len, kv_len)[:, None]
    k = torch.arange(kv_len)[None]
    return pattern.keep(q, k, length=kv_len + 1, max_distance=md).numpy()


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tile_classes_exact_for_empty_and_full(pattern, shape):
    q_len, kv_len, bm, bn, md = shape
    classes = tile_classes(pattern, q_len, kv_len, bm, bn, max_distance=md)
    keep = _keep(pattern, q_len, kv_len, md)
    token = pattern.token_table_np(kv_len + 1)
    d = np.arange(kv_len - q_len, kv_len)[:, None] - np.arange(kv_len)[None, :]
    token_keep = (d >= 0) & token[np.clip(d, 0, None)]
    nq, nk = classes.shape
    assert (nq, nk) == (-(-q_len // bm), -(-kv_len // bn))
    wasted = 0
    for a in range(nq):
        for b in range(nk):
            tile = keep[a * bm:(a + 1) * bm, b * bn:(b + 1) * bn]
            c = classes[a, b]
            if c == EMPTY:
                assert not tile.any()
            elif c == FULL:
                assert tile.all() and tile.shape[1] == bn
            elif c == TOKEN_PARTIAL:  # the token table alone is the mask, on a whole-width tile
                assert tile.shape[1] == bn
                assert np.array_equal(tile, token_keep[a * bm:(a + 1) * bm, b * bn:(b + 1) * bn])
            else:
                wasted += (not tile.any()) or bool(tile.all())
    assert wasted <= 0.02 * classes.size  # PARTIAL is exact up to a few straddling tiles


def test_block_granular_skips_most_tiles_at_length():
    pat = PPAPattern(0.75, 64, 0, "block", 128)
    classes = tile_classes(pat, 32768, 32768, 128, 128)
    causal = 256 * 257 // 2
    kept = int((classes != EMPTY).sum())
    assert kept < 0.2 * causal  # the spec's "skips 85% of tiles at 32k"
    assert int((classes == PARTIAL).sum()) <= 2 * 256  # diagonal and window tiles only


def test_token_pattern_partial_tiles_are_token_partial():
    classes = tile_classes(PPAPattern(0.75, 64, 2), 2000, 2000, 64, 64)
    assert (classes == TOKEN_PARTIAL).sum() > 0.9 * (classes != EMPTY).sum() - 2 * classes.shape[0]
    assert (classes[:, 0] != TOKEN_PARTIAL).all()  # the sink column needs the whole predicate
    assert not (tile_classes(PPAPattern(0.75, 64, 0, "block", 64), 2000, 2000, 64, 64) == TOKEN_PARTIAL).any()


def test_device_lists_put_token_partial_tiles_first():
    pattern = PPAPattern(0.5, 16, 3)
    classes = tile_classes(pattern, 500, 500, 32, 32, 0, 0, None)
    for transpose in (False, True):
        fp, fi, pp, pi, pm = (t.numpy() for t in device_lists(pattern, 500, 500, 32, 32, 0, 0, None, "cpu", transpose))
        c = classes.T if transpose else classes
        for r in range(c.shape[0]):
            assert sorted(fi[fp[r]:fp[r + 1]].tolist()) == np.flatnonzero(c[r] == FULL).tolist()
            assert pi[pp[r]:pm[r]].tolist() == np.flatnonzero(c[r] == TOKEN_PARTIAL).tolist()
            assert pi[pm[r]:pp[r + 1]].tolist() == np.flatnonzero(c[r] == PARTIAL).tolist()


def test_csr_lists_roundtrip():
    classes = tile_classes(PPAPattern(0.5, 16), 500, 500, 32, 32)
    for kind in (FULL, PARTIAL):
        for transpose in (False, True):
            ptr, idx = csr_lists(classes, kind, transpose)
            c = classes.T if transpose else classes
            for r in range(c.shape[0]):
                assert idx[ptr[r]:ptr[r + 1]].tolist() == np.flatnonzero(c[r] == kind).tolist()


@pytest.mark.parametrize("pattern", PATTERNS + [PPAPattern(0.75, 64, 5, "block", 128), PPAPattern(0.5, 8, 7)],
                         ids=lambda p: p.name)
@pytest.mark.parametrize("md", [None, 200])
def test_key_lists_match_keep(pattern, md):
    length = 3001
    q_pos = torch.tensor([[0, 1, 7, 130, 1000], [2998, 2999, 3000, 255, 256]])
    keys, count = pattern.key_lists(q_pos, length, md)
    assert keys.shape[:2] == q_pos.shape and count.shape == q_pos.shape
    keep = _keep(pattern, length, length, md)
    for b in range(q_pos.shape[0]):
        for i in range(q_pos.shape[1]):
            row = keys[b, i]
            listed = row[: count[b, i]]
            listed = listed[listed >= 0].tolist()
            assert len(listed) == len(set(listed))  # every key once
            assert sorted(listed) == np.flatnonzero(keep[q_pos[b, i]]).tolist()
            assert bool((row[count[b, i]:] == -1).all())  # nothing attended past count


def test_key_lists_width_depends_on_length_only():
    pattern = PPAPattern(0.75, 64, 4)
    a, _ = pattern.key_lists(torch.tensor([5]), 4000)
    b, _ = pattern.key_lists(torch.tensor([3999]), 4090)
    assert a.shape == b.shape  # both lengths round up to 4096: a static cache gives static shapes


def test_flex_blockmask_lists_match_classes():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from ppa_hf.ops.flex import single_sequence_block_mask

    pat = PPAPattern(0.75, 64, 0, "block", 128)
    bm = single_sequence_block_mask(pat, 1000, 1000, "cpu")
    classes = tile_classes(pat, 1000, 1000, 128, 128, ragged_partial=False)
    assert bm.kv_num_blocks[0, 0].tolist() == (classes == PARTIAL).sum(-1).tolist()
    assert bm.full_kv_num_blocks[0, 0].tolist() == (classes == FULL).sum(-1).tolist()
