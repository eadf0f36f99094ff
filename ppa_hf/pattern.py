"""The PPA pattern: the one place that decides which keys a query attends.

Every attention path (reference, dense-mask SDPA, FlexAttention, decode, Triton) is built from the functions here.

Token granularity (the paper's pattern, ``../shared/PPA_SPEC.md`` section 1): query position ``i`` attends
key position ``j`` (``0 <= j <= i``) iff the backward offset ``d = i - j`` satisfies

* ``d < window`` (the local window, the query itself included), or
* ``floor(d**p) > floor((d - 1)**p)`` for ``d >= 1`` (the power-spaced far offsets), or
* ``j < sink_tokens`` (attention sinks, an addition of this project; 0 reproduces the paper).

The far offsets are computed *exactly*: ``p`` is read as the rational it denotes (``0.75 -> 3/4``,
``1/3 -> 1/3``: any float within 1e-12 of a fraction with denominator <= 4096), and every comparison of
``d**p`` with an integer that floating point cannot settle is decided with integer arithmetic
(``d**a >= m**b`` for ``p = a/b``). For a ``p`` that is no such fraction, those comparisons use 60-digit
decimal logarithms.
"""

from __future__ import annotations

import math
import numbers
from decimal import Decimal, localcontext
from fractions import Fraction
from functools import lru_cache

import numpy as np
import torch

from .cache import BoundedCache

MAX_DENOMINATOR = 4096
_SNAP_TOLERANCE = 1e-12
_NEAR_INTEGER = 1e-9  # relative distance below which a float power is re-checked exactly


# ----------------------------------------------------------------------------------------------------------------------
# Validation (shared by config reading, apply(), CLIs)
# ----------------------------------------------------------------------------------------------------------------------
def check_p(value, name: str = "p") -> float:
    """Return ``value`` as a float in [0, 1] or raise ``ValueError`` naming ``name`` and the allowed range."""
    if isinstance(value, str):
        try:
            value = float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{name}={value!r} is not a number; {name} must be a real number in [0, 1]") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} is not a number; {name} must be a real number in [0, 1]")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r} is outside the allowed range; {name} must be a real number in [0, 1]")
    return value


def check_int(value, name: str, minimum: int) -> int:
    """Return ``value`` as an int >= ``minimum`` or raise ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            return check_int(int(value), name, minimum)
        raise ValueError(f"{name}={value!r} is not an integer; {name} must be an integer >= {minimum}")
    if value < minimum:
        raise ValueError(f"{name}={value!r} is outside the allowed range; {name} must be an integer >= {minimum}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------------------
# Exact powers
# ----------------------------------------------------------------------------------------------------------------------
def exact_p(p: float) -> Fraction | None:
    """The rational ``p`` denotes (denominator <= 4096), or ``None`` when ``p`` is no such fraction."""
    frac = Fraction(p).limit_denominator(MAX_DENOMINATOR)
    return frac if abs(float(frac) - p) <= _SNAP_TOLERANCE else None


class PowerRule:
    """Exact comparisons of ``x**p`` with integers, for integer ``x >= 0`` and ``0 < p <= 1``."""

    def __init__(self, p: float):
        self.p = check_p(p)
        if self.p == 0.0:
            raise ValueError("PowerRule needs p > 0 (p = 0 has no far offsets)")
        self.fraction = exact_p(self.p)

    def pow_ge(self, x: int, n: int) -> bool:
        """Exactly ``x**p >= n`` (``x, n`` non-negative integers)."""
        if n <= 0:
            return True
        if x == 0:
            return False
        if self.fraction is not None:
            a, b = self.fraction.numerator, self.fraction.denominator
            return x**a >= n**b
        with localcontext() as ctx:  # p*ln(x) >= ln(n); equality only at x = n = 1, handled exactly below
            ctx.prec = 60
            if x == 1 or n == 1:
                return n == 1  # 1**p >= n iff n == 1; x**p >= 1 for every x >= 1
            return Decimal(self.p) * Decimal(x).ln() >= Decimal(n).ln()

    def floor_pow(self, x: int) -> int:
        """Exactly ``floor(x**p)``."""
        if x <= 0:
            return 0
        n = int(math.floor(x**self.p))
        while not self.pow_ge(x, n):
            n -= 1
        while self.pow_ge(x, n + 1):
            n += 1
        return n

    def ceil_root(self, m: int) -> int:
        """Exactly the smallest integer ``d >= 1`` with ``d**p >= m`` (that is ``ceil(m**(1/p))``)."""
        d = max(1, int(math.ceil(m ** (1.0 / self.p))))
        while d > 1 and self.pow_ge(d - 1, m):
            d -= 1
        while not self.pow_ge(d, m):
            d += 1
        return d


@lru_cache(maxsize=256)
def _far_offsets_cached(p: float, limit: int) -> np.ndarray:
    if p == 0.0 or limit <= 1:
        return np.zeros(0, dtype=np.int64)
    if p == 1.0:
        return np.arange(1, limit, dtype=np.int64)
    rule = PowerRule(p)
    count = rule.floor_pow(limit - 1)  # far offsets d <= limit-1 are d_m for m = 1..count
    m = np.arange(1, count + 1, dtype=np.float64)
    inv = float(1 / rule.fraction) if rule.fraction is not None else 1.0 / p
    x = m**inv
    d = np.ceil(x).astype(np.int64)
    # Floating point decides every offset except those whose power lands (almost) on an integer:
    # p = 1/k gives exact k-th powers there, so re-derive those with integer arithmetic.
    near = np.abs(x - np.round(x)) <= _NEAR_INTEGER * np.maximum(1.0, x)
    for k in np.flatnonzero(near):
        d[k] = rule.ceil_root(int(m[k]))
    d = d[d < limit]
    return np.unique(d)


def far_offsets(p: float, limit: int) -> np.ndarray:
    """Sorted far offsets ``d`` in ``[1, limit)``: ``floor(d**p) > floor((d-1)**p)``, exactly.

    ``p = 0`` gives none, ``p = 1`` every offset, ``p = 1/2`` the perfect squares, ``p = 1/4`` fourth powers.
    """
    p = check_p(p)
    limit = check_int(limit, "limit", 0)
    return _far_offsets_cached(p, limit)


def _round_up_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def offset_table(p: float, window: int, length: int) -> np.ndarray:
    """Boolean ``[length]``: ``table[d]`` is True iff backward offset ``d`` is attended (window or far)."""
    table = np.zeros(length, dtype=bool)
    table[: min(window, length)] = True
    table[far_offsets(p, length)] = True
    return table


# ----------------------------------------------------------------------------------------------------------------------
# Block granularity
# ----------------------------------------------------------------------------------------------------------------------
def block_far_offsets(p: float, block_size: int, limit_blocks: int) -> np.ndarray:
    """Sorted far *block* offsets ``db`` in ``[1, limit_blocks)`` of the block-granular pattern.

    The rule keeps every ``block_size``-th far token offset, rounded up to its block: ``db`` is far iff
    ``floor((db*B)**p / B) > floor(((db-1)*B)**p / B)``, i.e. ``db = ceil(d_{mB} / B)`` where ``d_n`` is the
    n-th far token offset. So about ``L**p / B`` far blocks of ``B`` keys each: the same ``L**p`` key budget
    as the token pattern. ``p = 0``: none; ``p = 1``: every block.
    """
    p, block_size = check_p(p), check_int(block_size, "block_size", 1)
    limit_blocks = check_int(limit_blocks, "limit_blocks", 0)
    if p == 0.0 or limit_blocks <= 1:
        return np.zeros(0, dtype=np.int64)
    token = far_offsets(p, limit_blocks * block_size)
    every_bth = token[block_size - 1 :: block_size]  # d_{mB}: the (m*B)-th far token offset, m >= 1
    blocks = -(-every_bth // block_size)
    return np.unique(blocks[blocks < limit_blocks])


# ----------------------------------------------------------------------------------------------------------------------
# The pattern object: its tables, and its predicate elementwise on tensors
# ----------------------------------------------------------------------------------------------------------------------
TABLES = BoundedCache("pattern tables", 256)


def _device_table(pattern_key: tuple, kind: str, size: int, device: str) -> torch.Tensor:
    """A table of :meth:`PPAPattern._table_np` on ``device``, cached. A cached table is a plain dictionary read, which
    torch.compile traces as a guarded constant input; building one is host work (exact arithmetic in numpy) kept
    out of traced code. Eager forward passes build every table their pattern needs, see :meth:`PPAPattern.prime`."""
    table = TABLES._items.get((kind, pattern_key, size, device))
    return table if table is not None else _build_table(pattern_key, kind, size, device)


@torch.compiler.disable
def _build_table(pattern_key: tuple, kind: str, size: int, device: str) -> torch.Tensor:
    def build():
        return torch.from_numpy(PPAPattern(*pattern_key)._table_np(kind, size)).to(device)

    return TABLES.get((kind, pattern_key, size, device), build)


class PPAPattern:
    """One PPA pattern: ``p``, window, sinks and granularity. Hashable.

    Its tables are the single source every attention path reads:

    * :meth:`token_table`: bool over token offsets ``d`` (the window, plus the far offsets at token granularity);
    * :meth:`block_table`: bool over block offsets ``db`` (block granularity: the diagonal block and the far blocks);
    * :meth:`offsets` / :meth:`block_offsets`: the same tables as sorted lists of the attended offsets.

    :meth:`keep` is *the* predicate (dense masks, FlexAttention mask_mods and tests call it) and
    :meth:`key_lists` enumerates, from the same tables, the keys a query attends (gathered decoding).
    """

    def __init__(self, p: float, window: int = 64, sink_tokens: int = 0, granularity: str = "token",
                 block_size: int = 128):
        self.p = check_p(p)
        self.window = check_int(window, "window", 1)
        self.sink_tokens = check_int(sink_tokens, "sink_tokens", 0)
        if granularity not in ("token", "block"):
            raise ValueError(f"granularity={granularity!r} is not allowed; granularity must be 'token' or 'block'")
        self.granularity = granularity
        self.block_size = check_int(block_size, "block_size", 1)
        # every parameter, as plain values (the block size only matters at block granularity)
        self._key = (self.p, self.window, self.sink_tokens, self.granularity,
                     self.block_size if self.granularity == "block" else 128)

    @property
    def key(self) -> tuple:
        """Every parameter as plain values, ``(p, window, sink_tokens, granularity, block_size)``: the pattern's
        identity in cache keys (torch.compile traces plain tuples, not objects with their own ``__hash__``)."""
        return self._key

    def __eq__(self, other):
        return isinstance(other, PPAPattern) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    @property
    def name(self) -> str:
        """A name recording every parameter, e.g. ``ppa_p0.75_w64_s0`` or ``ppa_p0.75_w64_s4_block128``."""
        tail = f"_block{self.block_size}" if self.granularity == "block" else ""
        return f"ppa_p{self.p:g}_w{self.window}_s{self.sink_tokens}{tail}"

    __repr__ = lambda self: f"PPAPattern({self.name})"  # noqa: E731

    @property
    def is_full(self) -> bool:
        """True when the pattern is plain causal attention (p = 1, any window, any sinks)."""
        return self.p == 1.0

    @property
    def is_block(self) -> bool:
        return self.granularity == "block"

    # -- tables (numpy on the host; ``*_tensor`` on a device, cached) ----------------------------------------------
    def token_table_np(self, length: int) -> np.ndarray:
        """``[length]`` bool: token offset ``d`` attended through the window or (token granularity) a far offset."""
        if self.is_block:
            return np.arange(length) < self.window
        return offset_table(self.p, self.window, length)

    def block_table_np(self, n_blocks: int) -> np.ndarray:
        """``[n_blocks]`` bool: block offset ``db`` attended (block granularity; ``db = 0``, the diagonal, included).
        At token granularity no block offset is attended through the block rule: all False."""
        table = np.zeros(n_blocks, dtype=bool)
        if self.is_block and n_blocks:
            table[0] = True
            table[block_far_offsets(self.p, self.block_size, n_blocks)] = True
        return table

    def n_blocks(self, length: int) -> int:
        """Size of the block table that covers positions below ``length`` (block offsets up to ``length / B``)."""
        return -(-max(length, 1) // self.block_size) + 1

    def token_table(self, length: int, device="cpu") -> torch.Tensor:
        """``[>= length]`` bool tensor of :meth:`token_table_np` (size rounded up to a power of two: decoding step
        after step reuses one table)."""
        return _device_table(self._key, "token", _round_up_pow2(max(length, 1)), str(device))

    def block_table(self, length: int, device="cpu") -> torch.Tensor:
        """``[>= n_blocks(length)]`` bool tensor of :meth:`block_table_np` for positions below ``length``."""
        return _device_table(self._key, "block", _round_up_pow2(self.n_blocks(length)), str(device))

    def offsets(self, length: int, device="cpu") -> torch.Tensor:
        """Sorted attended token offsets of :meth:`token_table` (long tensor; all below its power-of-two size)."""
        return _device_table(self._key, "offsets", _round_up_pow2(max(length, 1)), str(device))

    def block_offsets(self, length: int, device="cpu") -> torch.Tensor:
        """Sorted attended block offsets of :meth:`block_table` (long tensor; empty at token granularity)."""
        return _device_table(self._key, "block_offsets", _round_up_pow2(self.n_blocks(length)), str(device))

    def prime(self, length: int, device="cpu") -> None:
        """Build every device table the attention paths read for positions below ``length`` (cheap when cached), so
        that a compiled step after this eager one only reads them."""
        self.tables(length, device)
        self.offsets(length, device)
        if self.is_block:
            self.block_offsets(length, device)

    def _table_np(self, kind: str, size: int) -> np.ndarray:
        if kind == "token":
            return self.token_table_np(size)
        if kind == "block":
            return self.block_table_np(size)
        if kind == "offsets":
            return np.flatnonzero(self.token_table_np(size))
        return np.flatnonzero(self.block_table_np(size))  # block_offsets

    def keep(self, q_pos: torch.Tensor, k_pos: torch.Tensor, length: int | None = None,
             max_distance: int | None = None, tables=None) -> torch.Tensor:
        """Whether a query at ``q_pos`` attends a key at ``k_pos`` of the same sequence (broadcasting).

        Positions count tokens from the sequence's first real token. ``length`` bounds the positions (tables
        are built for it; default: the largest position given). ``max_distance`` (a model's own sliding
        window) further limits every key to ``q_pos - k_pos < max_distance``. ``tables`` (from
        :meth:`tables`) may be passed to avoid a lookup, as FlexAttention mask_mods do.
        """
        d = q_pos - k_pos
        ok = d >= 0
        if not self.is_full:  # (p = 1 attends every earlier key: no table to read)
            if tables is None:
                if length is None:
                    length = int(max(int(q_pos.max()), int(k_pos.max()), 0)) + 1
                tables = self.tables(length, q_pos.device)
            hit = self._hit(q_pos, k_pos, *tables, d=d)
            if self.sink_tokens:
                hit = hit | (k_pos < self.sink_tokens)
            ok = ok & hit
        if max_distance is not None:
            ok = ok & (d < max_distance)
        return ok

    def tables(self, length: int, device="cpu"):
        """``(token_table, block_table or None)`` for positions below ``length``."""
        block = self.block_table(length, device) if self.is_block else None
        return self.token_table(length, device), block

    def key_lists(self, q_pos: torch.Tensor, length: int, max_distance: int | None = None):
        """The keys each query attends, listed from the tables: ``(keys [*S, N] long, count [*S] int32)`` for
        queries at positions ``q_pos [*S]`` (long, inside one sequence each, all below ``length``).

        Every attended key position appears exactly once among the first ``count`` entries of its list; entries that
        are not attended hold -1 (a list is padded to ``N``, which depends only on ``length`` rounded up to a power of
        two, so a static KV cache gives static shapes). Elementwise tensor work, no host synchronisation. Order:
        sinks not otherwise attended, then (token granularity) ``q - d`` for the attended offsets ``d`` in ascending
        order, or (block granularity) the window keys outside attended blocks, then whole attended blocks."""
        q = q_pos[..., None]
        device = q_pos.device
        token_table, block_table = self.tables(length, device)
        parts, counts = [], []
        if self.sink_tokens:  # a sink the rest of the pattern already attends is listed there, not here
            j = torch.arange(self.sink_tokens, device=device)
            sink_ok = (j <= q) & ~self._hit(q, j, token_table, block_table)
            parts.append(torch.where(sink_ok, j, -1))
            counts.append(self.sink_tokens)
        if self.is_block:
            bs = self.block_size
            d = torch.arange(self.window, device=device)
            win_keys = q - d
            win_ok = (d <= q) & ~block_table[(q // bs - win_keys.clamp(min=0) // bs).clamp(0, block_table.numel() - 1)]
            parts.append(torch.where(win_ok, win_keys, -1))
            counts.append(self.window)
            dbs = self.block_offsets(length, device)  # ascending, 0 (the diagonal block) first
            kb = q // bs - dbs  # [*S, nb]
            keys = kb[..., None] * bs + torch.arange(bs, device=device)  # [*S, nb, bs]
            ok = (kb[..., None] >= 0) & (keys <= q[..., None])
            parts.append(torch.where(ok, keys, -1).flatten(-2))
            counts.append(torch.searchsorted(dbs, q_pos // bs, right=True) * bs)
        else:
            offs = self.offsets(length, device)  # ascending
            parts.append(torch.where(offs <= q, q - offs, -1))
            counts.append(torch.searchsorted(offs, q_pos, right=True))
        keys = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        if max_distance is not None:
            keys = torch.where(q - keys < max_distance, keys, -1)
        count = counts[-1] + sum(counts[:-1]) if len(counts) > 1 else counts[0]  # earlier lists are counted whole
        return keys, count.to(torch.int32)

    def _hit(self, q_pos, k_pos, token_table, block_table, d=None):
        """Window, far or block part of :meth:`keep` (no sinks, no causality), for ``q_pos >= k_pos``; ``d``: ``q_pos -
        k_pos`` when the caller has it."""
        d = q_pos - k_pos if d is None else d
        hit = token_table[d.clamp(0, token_table.numel() - 1)]
        if block_table is not None:
            db = q_pos // self.block_size - k_pos // self.block_size
            hit = hit | block_table[db.clamp(0, block_table.numel() - 1)]
        return hit

    def dense(self, length: int, kv_length: int | None = None, device="cpu") -> torch.Tensor:
        """``[length, kv_length]`` bool mask of one unpadded sequence (queries = its last ``length`` tokens)."""
        kv_length = length if kv_length is None else kv_length
        q = torch.arange(kv_length - length, kv_length, device=device)[:, None]
        k = torch.arange(kv_length, device=device)[None, :]
        return self.keep(q, k, length=kv_length)

    def mask_mod(self, length: int = 131072, device="cpu"):
        """A FlexAttention ``mask_mod`` for one unpadded sequence, named after the pattern (attention-gym)."""
        tables = self.tables(length, device)

        def mask_mod(b, h, q_idx, kv_idx):
            return self.keep(q_idx, kv_idx, tables=tables)

        mask_mod.__name__ = self.name
        return mask_mod


def dense_mask(length: int, p: float, window: int = 64, sink_tokens: int = 0, kv_length: int | None = None,
               device="cpu", granularity: str = "token", block_size: int = 128) -> torch.Tensor:
    """``[q_len, kv_len]`` bool mask of one unpadded sequence (see :meth:`PPAPattern.dense`)."""
    return PPAPattern(p, window, sink_tokens, granularity, block_size).dense(length, kv_length, device)


def ppa_mask_mod(p: float, window: int = 64, sink_tokens: int = 0, length: int = 131072, device="cpu",
                 granularity: str = "token", block_size: int = 128):
    """FlexAttention ``mask_mod`` factory named after its parameters, e.g. ``ppa_p0.75_w64_s0``."""
    return PPAPattern(p, window, sink_tokens, granularity, block_size).mask_mod(length, device)


# ----------------------------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------------------------
def attended_keys(i: int, p: float, window: int = 64, sink_tokens: int = 0) -> int:
    """Number of keys a query at position ``i`` attends (exact; closed form for the window and far parts).

    Without sinks and for ``i >= window`` this is ``window + floor(i**p) - floor((window-1)**p)`` (spec section 1).
    """
    p, window, sink_tokens = check_p(p), check_int(window, "window", 1), check_int(sink_tokens, "sink_tokens", 0)
    i = check_int(i, "i", 0)
    if i < window:
        return i + 1
    far = 0
    if p > 0:
        rule = PowerRule(p)
        far = rule.floor_pow(i) - rule.floor_pow(window - 1)
    count = window + far
    if sink_tokens:  # sinks not already attended through the window or a far offset
        table = offset_table(p, window, i + 1)
        js = np.arange(min(sink_tokens, i + 1))
        count += int((~table[i - js]).sum())
    return count


def attended_keys_per_query(length: int, p: float, window: int = 64, sink_tokens: int = 0) -> np.ndarray:
    """``[length]`` int64: keys attended by each query position of one sequence (counted from the table)."""
    table = offset_table(p, window, max(length, 1))
    counts = np.cumsum(table)[:length].astype(np.int64)  # offsets 0..i
    if sink_tokens:
        for j in range(min(sink_tokens, length)):
            i = np.arange(j, length)
            counts[j:] += ~table[i - j]
    return counts


def score_entries(length: int, p: float, window: int = 64, sink_tokens: int = 0) -> int:
    """Attended (query, key) pairs of a causal sequence of ``length`` tokens: ``O(L**(1+p))``."""
    return int(attended_keys_per_query(length, p, window, sink_tokens).sum())
