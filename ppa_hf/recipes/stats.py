"""Small-sample statistics for accuracy curves: Wilson score intervals, Fisher's exact test (two independent
proportions) and McNemar's exact test (two paired outcomes on the same prompts). Pure Python, no SciPy needed."""

from __future__ import annotations

import math
from statistics import NormalDist


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1)")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a binomial proportion ``successes / n`` (no continuity correction).

    Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse to a point at 0 or n successes.
    """
    successes, n = int(successes), int(n)
    if n <= 0:
        raise ValueError(f"n={n} must be positive")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must be in [0, n={n}]")
    z = _z(confidence)
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    # exact ends at 0 and n (the formula gives them up to rounding)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided p-value of Fisher's exact test on the 2x2 table ``[[a, b], [c, d]]`` (rows: groups, columns:
    success / failure), summing every table with the same margins that is no more likely than the observed one
    (SciPy's ``fisher_exact(..., alternative="two-sided")`` convention)."""
    a, b, c, d = (int(x) for x in (a, b, c, d))
    if min(a, b, c, d) < 0:
        raise ValueError("table entries must be non-negative")
    row1, row2, col1 = a + b, c + d, a + c
    n = row1 + row2
    if n == 0:
        return 1.0
    lo, hi = max(0, col1 - row2), min(col1, row1)

    def logp(x: int) -> float:  # hypergeometric probability of a = x
        return _log_comb(row1, x) + _log_comb(row2, col1 - x) - _log_comb(n, col1)

    observed = logp(a)
    total = sum(math.exp(logp(x)) for x in range(lo, hi + 1) if logp(x) <= observed + 1e-7)
    return min(1.0, total)


def fisher_proportions(k1: int, n1: int, k2: int, n2: int) -> float:
    """Fisher's exact two-sided p-value for ``k1 / n1`` vs ``k2 / n2`` (independent samples)."""
    return fisher_exact(k1, n1 - k1, k2, n2 - k2)


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes: ``only_first`` = prompts the first system got
    right and the second wrong, ``only_second`` the reverse (ties carry no information). It is the two-sided
    binomial test of ``only_first`` out of ``only_first + only_second`` at 1/2."""
    b, c = int(only_first), int(only_second)
    if min(b, c) < 0:
        raise ValueError("counts must be non-negative")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.exp(_log_comb(n, i) - n * math.log(2)) for i in range(k + 1))
    return min(1.0, 2 * tail)


def mcnemar_paired(first: list, second: list) -> dict:
    """McNemar's exact test on two equal-length lists of per-prompt outcomes (truthy = correct), the same
    prompts in the same order. Returns ``{"n", "both", "only_first", "only_second", "neither", "p_value"}``."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need equal lengths, got {len(first)} and {len(second)}")
    pairs = [(bool(x), bool(y)) for x, y in zip(first, second)]
    b = sum(1 for x, y in pairs if x and not y)
    c = sum(1 for x, y in pairs if y and not x)
    both = sum(1 for x, y in pairs if x and y)
    return {"n": len(pairs), "both": both, "only_first": b, "only_second": c, "neither": len(pairs) - both - b - c,
            "p_value": mcnemar_exact(b, c)}
