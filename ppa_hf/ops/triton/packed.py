"""The block-sparse Triton kernels on any layout: packed sequences, left padding, padding holes.

The kernels of :mod:`.prefill` take one sequence per batch row, starting at kv index 0. Here a layout's rows are
first checked on the host (one read per layout, :func:`_layout_plan`): when they already are such rows (the usual
case: no padding, or right padding) the kernels run on the inputs as they are; otherwise every sequence is copied
into a row of its own (token at position ``pos`` of sequence ``s`` -> row ``s``, index ``pos``; rows right-padded to
the longest sequence), the kernels run there, and the results are copied back. Exact for every layout whose keys
start at kv index 0 (``kv_offset == 0``): the pattern reads positions inside a sequence, and a sequence's tokens are
its row's first tokens, in order.

The whole call is one custom op (forward and backward): the host-side look at the layout happens inside it, so
torch.compile traces a layer's attention without a graph break. The price of unpacking is a copy of q, k, v (and
o, dO, the gradients) and, when sequence lengths differ a lot, kernel work on the padding of the short rows.
"""

from __future__ import annotations

import math

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ...layout import PPALayout, single_sequence_checks
from ...pattern import PPAPattern
from .common import last_contiguous, unsupported_reason
from .prefill import _Ctx, _backward, _forward, _key, _lse_len, _pattern


class _Unpacked:
    """Where each token goes when every sequence of a layout gets a row of its own: ``S`` rows of ``L`` slots, the
    token at position ``pos`` of sequence ``s`` in slot ``s * L + pos``.

    Four gather maps, all on the device: ``key_slot [B * T]`` / ``q_slot [B * Q]`` (the slot of each kv token / query,
    ``S * L`` for padding) and ``slot_key`` / ``slot_q [S * L]`` (the kv token / query in each slot, ``B * T`` /
    ``B * Q`` for an empty slot). Copies are gathers along them, with the empty entries zeroed (``+inf`` for LSE)."""

    def __init__(self, seg: torch.Tensor, pos: torch.Tensor, q_index: torch.Tensor, valid: torch.Tensor,
                 per_row: torch.Tensor, S: int, L: int, n_keys: int, n_queries: int):
        """``valid [B, T]``: real tokens; ``per_row [B]``: sequences in each row (0 for a row of padding); ``S``,
        ``L``, ``n_keys``, ``n_queries``: the host-read sizes (sequences, longest sequence, real kv tokens, real
        queries)."""
        B, T = seg.shape
        Q = q_index.numel()
        self.S, self.L = S, L
        # where something is missing: only there a copy needs its fill pass
        self.key_holes, self.q_holes = S * L > n_keys, S * L > n_queries  # empty slots in the rows
        self.key_padding, self.q_padding = n_keys < B * T, n_queries < B * Q  # padding in layout order
        first = torch.cumsum(per_row, 0) - per_row  # global id of each row's first sequence
        slot = torch.where(valid, (first[:, None] + seg) * L + pos, S * L)  # [B, T]
        self.key_slot = slot.flatten()
        self.q_slot = slot[:, q_index].flatten()
        self.slot_key = self._inverse(self.key_slot, S * L)
        self.slot_q = self._inverse(self.q_slot, S * L)

    @staticmethod
    def _inverse(slot_of: torch.Tensor, n_slots: int) -> torch.Tensor:
        """``[n_slots]``: the index whose ``slot_of`` is each slot, ``len(slot_of)`` where none is (every real index
        has a slot of its own; padding goes to the extra slot ``n_slots``, dropped)."""
        n = slot_of.numel()
        inverse = torch.full((n_slots + 1,), n, dtype=torch.long, device=slot_of.device)
        inverse.scatter_(0, slot_of, torch.arange(n, device=slot_of.device))
        return inverse[:n_slots]

    @staticmethod
    def _gather(flat: torch.Tensor, index: torch.Tensor, fill: float, holes: bool) -> torch.Tensor:
        """``flat[index]`` along dim 0, with ``fill`` where ``index == len(flat)`` (nothing there; ``holes``: some
        index is)."""
        n = flat.shape[0]
        out = flat.index_select(0, index.clamp(max=n - 1) if holes else index)
        return out.masked_fill_((index == n).view(-1, *([1] * (out.dim() - 1))), fill) if holes else out

    def to_rows(self, x: torch.Tensor, queries: bool) -> torch.Tensor:
        """``x [B, Hx, N, D]`` (queries or kv tokens) -> ``[S, Hx, L, D]``, zeros in empty slots (padded keys must
        be finite: a dot with a zero probability still multiplies them)."""
        B, Hx, N, D = x.shape
        flat = x.transpose(1, 2).reshape(B * N, Hx, D)  # a view when x is [B, N, Hx, D] underneath (Transformers)
        index, holes = (self.slot_q, self.q_holes) if queries else (self.slot_key, self.key_holes)
        return self._gather(flat, index, 0.0, holes).view(self.S, self.L, Hx, D).transpose(1, 2)

    def from_rows(self, y: torch.Tensor, like: torch.Tensor, queries: bool) -> torch.Tensor:
        """``y [S, Hx, L, D]`` -> a tensor shaped and strided like ``like [B, Hx, N, D]`` (the fake implementations
        promise that), zeros for padding."""
        B, Hx, N, D = like.shape
        flat = y.transpose(1, 2).reshape(self.S * self.L, Hx, D)
        index, padding = (self.q_slot, self.q_padding) if queries else (self.key_slot, self.key_padding)
        out = self._gather(flat, index, 0.0, padding).view(B, N, Hx, D).transpose(1, 2)
        if out.stride() != like.stride():
            out = torch.empty_like(like).copy_(out)
        return out

    def lse_to_rows(self, lse: torch.Tensor, q: torch.Tensor, rows_q: torch.Tensor) -> torch.Tensor:
        """The forward's LSE in query order ``[B, H, >= Q]`` -> the unpacked rows' ``[S, H, lse_len]`` (+inf where
        no query sits: such rows get probability 0 in the backward)."""
        B, H, Q = q.shape[0], q.shape[1], q.shape[2]
        flat = lse[:, :, :Q].transpose(1, 2).reshape(B * Q, H)
        rows = self._gather(flat, self.slot_q, float("inf"), self.q_holes)
        out = torch.full((self.S, H, _lse_len(rows_q)), float("inf"), device=q.device, dtype=torch.float32)
        out[:, :, :self.L] = rows.view(self.S, self.L, H).transpose(1, 2)
        return out

    def lse_from_rows(self, lse_rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The rows' LSE ``[S, H, >= L]`` -> query order ``[B, H, lse_len]`` (+inf at padded queries)."""
        B, H, Q = q.shape[0], q.shape[1], q.shape[2]
        flat = lse_rows[:, :, :self.L].transpose(1, 2).reshape(self.S * self.L, H)
        # (a gather into a fresh tensor: a view of ``out`` would alias the copy into it, which CUDA refuses)
        back = self._gather(flat, self.q_slot, float("inf"), self.q_padding)
        out = torch.full((B, H, _lse_len(q)), float("inf"), device=q.device, dtype=torch.float32)
        out[:, :, :Q] = back.view(B, Q, H).transpose(1, 2)
        return out


def _plan(seg: torch.Tensor, pos: torch.Tensor, q_index: torch.Tensor):
    """``("rows", (q_start, k_start, q_valid))`` when the layout's rows are the kernels' rows already (every row one
    sequence from kv index 0, right padding at most, the queries consecutive; rows of padding too), ``("empty",
    None)`` when there is no query, else ``("unpack", _Unpacked)``. One host read (what
    :meth:`PPALayout.single_sequence_rows` and the unpacked sizes would read in about six)."""
    if q_index.numel() == 0:
        return "empty", None
    valid = seg >= 0
    q_valid = valid[:, q_index]
    per_row = seg.max(dim=-1).values + 1
    sizes = torch.stack([per_row.sum(), torch.where(valid, pos, -1).max() + 1, valid.sum()])
    stats = torch.cat([single_sequence_checks(seg, valid, q_index, q_valid), sizes]).tolist()  # the one host read
    rows_ok, consecutive, q0, n_queries, S, L, n_keys = stats
    if rows_ok and consecutive:
        return "rows", (q0, 0, None if n_queries == q_valid.numel() else q_valid)
    # (S >= 1 here: rows of padding alone pass the test above)
    return "unpack", _Unpacked(seg, pos, q_index, valid, per_row, S, L, n_keys, n_queries)


# The plan depends on the layout's tensors alone, which every layer of a forward pass shares, as do its backward and
# a checkpointed recomputation: in eager mode kept per ``seg`` tensor, weakly (it goes when the layout's tensors go),
# and used while none of the three tensors has been modified in place. Not under torch.compile: there the layout's
# tensors can be buffers that a CUDA-graph replay refills without a version bump (cudagraph trees hand back the same
# tensor objects), so compiled calls plan every time. Each model's layouts have tensors of their own.
_PLANS = WeakIdKeyDictionary()


def _layout_plan(seg: torch.Tensor, pos: torch.Tensor, q_index: torch.Tensor, reuse: bool):
    """:func:`_plan`; with ``reuse`` (eager calls), made once per layout (one host read per forward pass instead of one
    per layer and direction)."""
    if not reuse or seg.is_inference():  # (inference tensors have no version counter to tell a change by)
        return _plan(seg, pos, q_index)
    versions = (seg._version, pos._version, q_index._version)
    hit = _PLANS.get(seg)
    if hit is not None and hit[0] is pos and hit[1] is q_index and hit[2] == versions:
        return hit[3]
    plan = _plan(seg, pos, q_index)
    _PLANS[seg] = (pos, q_index, versions, plan)
    return plan


# The ops read the layout on the host (a synchronisation), which a CUDA graph cannot capture: tagged so that
# torch.compile's CUDA graphs ("reduce-overhead") leave them out instead of failing while recording.
_HOST_READS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("ppa_hf::packed_prefill_forward", mutates_args=(), tags=_HOST_READS)
def _packed_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor,
                    q_index: torch.Tensor, pattern_key: list[float], granularity: str, max_distance: int | None,
                    scale: float, reuse_plan: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pattern = _pattern(_key(pattern_key, granularity))
    q, k, v = last_contiguous(q), last_contiguous(k), last_contiguous(v)
    kind, plan = _layout_plan(seg, pos, q_index, reuse_plan)
    if kind == "empty":  # no query
        lse = torch.full((q.shape[0], q.shape[1], _lse_len(q)), float("inf"), device=q.device, dtype=torch.float32)
        return torch.zeros_like(q), lse
    if kind == "rows":
        q_start, k_start, q_valid = plan
        out, lse = _forward(_Ctx(pattern, q, k, q_start, k_start, max_distance), q, k, v, scale)
        if q_valid is not None:  # right padding: padded queries return zeros
            out.mul_(q_valid[:, None, :, None].to(out.dtype))
        return out, lse
    rq = plan.to_rows(q, queries=True)
    rk, rv = (plan.to_rows(x, queries=False) for x in (k, v))
    out_rows, lse_rows = _forward(_Ctx(pattern, rq, rk, 0, 0, max_distance), rq, rk, rv, scale)
    return plan.from_rows(out_rows, q, queries=True), plan.lse_from_rows(lse_rows, q)


@_packed_forward.register_fake
def _(q, k, v, seg, pos, q_index, pattern_key, granularity, max_distance, scale, reuse_plan):
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[1], _lse_len(q)), dtype=torch.float32)


@torch.library.custom_op("ppa_hf::packed_prefill_backward", mutates_args=(), tags=_HOST_READS)
def _packed_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                     do: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor, q_index: torch.Tensor,
                     pattern_key: list[float], granularity: str, max_distance: int | None, scale: float,
                     reuse_plan: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pattern = _pattern(_key(pattern_key, granularity))
    q, k, v = last_contiguous(q), last_contiguous(k), last_contiguous(v)
    kind, plan = _layout_plan(seg, pos, q_index, reuse_plan)
    if kind == "empty":
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if kind == "rows":
        q_start, k_start, q_valid = plan
        if q_valid is not None:  # the forward zeroed these outputs: no gradient flows through them
            do = do * q_valid[:, None, :, None].to(do.dtype)
        return _backward(_Ctx(pattern, q, k, q_start, k_start, max_distance), q, k, v, o, lse, do, scale)
    rq, ro, rdo = (plan.to_rows(x, queries=True) for x in (q, o, last_contiguous(do)))
    rk, rv = (plan.to_rows(x, queries=False) for x in (k, v))
    rlse = plan.lse_to_rows(lse, q, rq)
    dq, dk, dv = _backward(_Ctx(pattern, rq, rk, 0, 0, max_distance), rq, rk, rv, ro, rlse, rdo, scale)
    return (plan.from_rows(dq, q, queries=True), plan.from_rows(dk, k, queries=False),
            plan.from_rows(dv, v, queries=False))


@_packed_backward.register_fake
def _(q, k, v, o, lse, do, seg, pos, q_index, pattern_key, granularity, max_distance, scale, reuse_plan):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, seg, pos, q_index, *args = inputs
    ctx.save_for_backward(q, k, v, *output, seg, pos, q_index)
    ctx.args = args


def _packed_grad(ctx, do, dlse):
    q, k, v, o, lse, seg, pos, q_index = ctx.saved_tensors
    dq, dk, dv = _packed_backward(q, k, v, o, lse, do, seg, pos, q_index, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_packed_forward.register_autograd(_packed_grad, setup_context=_setup_context)


def triton_layout_attention(query, key, value, layout: PPALayout, pattern: PPAPattern,
                            max_distance: int | None = None, scale: float | None = None) -> torch.Tensor:
    """PPA attention on any layout whose keys start at kv index 0. ``query [B, H, Q, D]``, ``key``/``value
    [B, Hkv, K, D]`` -> ``[B, H, Q, D]`` (zeros for padding queries). Differentiable; torch.compile traces it as
    one op."""
    reason = unsupported_reason(query, key, value)
    if reason is not None:
        raise ValueError(f"the Triton attention kernel cannot run: {reason}")
    if layout.kv_offset != 0 or key.shape[2] != layout.kv_length:
        raise ValueError(f"the Triton kernels on a layout need its keys from kv index 0 (got kv_offset="
                         f"{layout.kv_offset}, {key.shape[2]} keys for kv_length={layout.kv_length})")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    p, window, sinks, granularity, block_size = pattern._key
    reuse_plan = not torch.compiler.is_compiling()  # (see _PLANS)
    out, _ = _packed_forward(query, key, value, layout.seg, layout.pos, layout.q_index,
                             [p, window, sinks, block_size], granularity, max_distance, scale, reuse_plan)
    return out
