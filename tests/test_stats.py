"""ppa_hf.recipes.stats against published / SciPy values (hard-coded so the test runs without SciPy, and against
SciPy itself where it is installed)."""

import importlib.util

import pytest

from ppa_hf.recipes.stats import (fisher_exact, fisher_proportions, mcnemar_exact, mcnemar_paired,
                                  wilson_interval)

HAS_SCIPY = importlib.util.find_spec("scipy") is not None


@pytest.mark.parametrize("k, n, low, high", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score, no continuity correction)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    # values of docs/results.md (n = 100), from scipy.stats.binomtest(k, 100).proportion_ci(method="wilson")
    (27, 100, 0.19270, 0.36432),
    (67, 100, 0.57305, 0.75437),
    (100, 100, 0.96301, 1.0),
])
def test_wilson_known_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(low, abs=1e-4) and got[1] == pytest.approx(high, abs=1e-4)


def test_wilson_properties_and_errors():
    low, high = wilson_interval(5, 10)
    assert low < 0.5 < high and low + high == pytest.approx(1.0)  # symmetric at 1/2
    assert wilson_interval(5, 10, 0.99)[0] < low  # wider at higher confidence
    assert wilson_interval(50, 100)[1] - wilson_interval(50, 100)[0] < high - low  # narrower with more samples
    for bad in [(1, 0), (-1, 10), (11, 10)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError):
        wilson_interval(1, 10, 1.0)


@pytest.mark.parametrize("table, p", [
    ([3, 97, 8, 92], 0.2134099),       # p = 0.5 vs 0.625 of docs/results.md (scipy.stats.fisher_exact)
    ([17, 83, 27, 73], 0.1238787),     # block vs token at p = 0.75
    ([67, 33, 100, 0], 9.757377e-12),  # p = 0.875 vs full attention
    ([8, 2, 1, 5], 0.03496503),        # the tea-tasting-style textbook table (scipy docs: 0.0349...)
    ([0, 5, 5, 0], 0.007936508),       # 2 / C(10, 5)
])
def test_fisher_known_values(table, p):
    assert fisher_exact(*table) == pytest.approx(p, rel=1e-5)


def test_fisher_proportions_and_symmetry():
    assert fisher_proportions(3, 100, 8, 100) == pytest.approx(fisher_exact(3, 97, 8, 92))
    assert fisher_exact(3, 97, 8, 92) == pytest.approx(fisher_exact(8, 92, 3, 97))
    assert fisher_exact(5, 5, 5, 5) == pytest.approx(1.0)


def test_mcnemar_known_values():
    # exact McNemar = two-sided binomial test at 1/2 on the discordant pairs
    assert mcnemar_exact(3, 10) == pytest.approx(0.09228515625)  # 2 * P(X <= 3), X ~ Bin(13, 1/2) = 2*378/8192
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(4, 4) == 1.0 and mcnemar_exact(0, 0) == 1.0
    result = mcnemar_paired([1, 1, 0, 0, 1, 0], [1, 0, 1, 1, 1, 1])
    assert (result["both"], result["only_first"], result["only_second"], result["neither"]) == (2, 1, 3, 0)
    assert result["p_value"] == pytest.approx(mcnemar_exact(1, 3))
    with pytest.raises(ValueError):
        mcnemar_paired([1], [1, 0])


@pytest.mark.skipif(not HAS_SCIPY, reason="scipy not installed")
def test_against_scipy():
    from scipy.stats import binomtest
    from scipy.stats import fisher_exact as scipy_fisher

    for k, n in [(0, 7), (1, 100), (13, 40), (499, 500), (250, 500)]:
        ci = binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    for table in [(1, 9, 11, 3), (12, 5, 7, 9), (0, 10, 3, 7), (40, 60, 55, 45)]:
        assert fisher_exact(*table) == pytest.approx(scipy_fisher([table[:2], table[2:]])[1], rel=1e-7)
    for b, c in [(2, 9), (15, 15), (30, 12), (0, 1)]:
        assert mcnemar_exact(b, c) == pytest.approx(min(1.0, binomtest(b, b + c).pvalue), rel=1e-9)
