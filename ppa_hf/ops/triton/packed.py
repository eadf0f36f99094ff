"""The block-sparse Triton kernels on any layout: packed sequences, left padding, padding holes.

The kernels of :mod:`.prefill` take one sequence per batch row, starting at kv index 0. Here a layout's rows are
first checked on the host: when they already are such rows (the usual case: no padding, or right padding) the
kernels run on the inputs as they are; otherwise every sequence is copied into a row of its own (token at position
``pos`` of sequence ``s`` -> row ``s``, index ``pos``; rows right-padded to the longest sequence), the kernels run
there, and the results are copied back. Exact for every layout whose keys start at kv index 0 (``kv_offset == 0``):
the pattern reads positions inside a sequence, and a sequence's tokens are its row's first tokens, in order.

The whole call is one custom op (forward and backward): the host-side look at the layout happens inside it, so
torch.compile traces a layer's attention without a graph break. The price of unpacking is a copy of q, k, v (and
o, dO, the gradients) and, when sequence lengths differ a lot, kernel work on the padding of the short rows.
"""

from __future__ import annotations

import math

import torch

from ...layout import PPALayout
from ...pattern import PPAPattern
from .common import last_contiguous, unsupported_reason
from .prefill import _Ctx, _backward, _forward, _key, _lse_len, _pattern


class _Unpacked:
    """Where each token goes when every sequence of ``seg``/``pos [B, T]`` gets a row of its own (host reads).

    ``S`` rows of ``L`` tokens; ``key_src``/``key_dst``: flat ``b * T + t`` of each real kv token and its flat
    ``s * L + pos`` destination; ``q_src``/``q_dst`` the same for the real queries (``b * Q + r``)."""

    def __init__(self, seg: torch.Tensor, pos: torch.Tensor, q_index: torch.Tensor):
        B, T = seg.shape
        valid = seg >= 0
        per_row = seg.max(dim=-1).values + 1  # sequences in each row (0 for a row of padding)
        first = torch.cumsum(per_row, 0) - per_row  # global id of each row's first sequence
        self.S = int(per_row.sum())
        self.L = int(torch.where(valid, pos, -1).max()) + 1 if self.S else 1
        dst = torch.where(valid, (first[:, None] + seg) * self.L + pos, -1)
        self.key_src = valid.flatten().nonzero().squeeze(1)
        self.key_dst = dst.flatten()[self.key_src]
        q_dst = dst[:, q_index]  # [B, Q]
        self.q_src = (q_dst >= 0).flatten().nonzero().squeeze(1)
        self.q_dst = q_dst.flatten()[self.q_src]

    def to_rows(self, x: torch.Tensor, src, dst) -> torch.Tensor:
        """``x [B, Hx, N, D]`` -> ``[S, Hx, L, D]``, zeros where no token lands."""
        B, Hx, N, D = x.shape
        rows = x.new_zeros(self.S * self.L, Hx, D)
        rows[dst] = x.transpose(1, 2).reshape(B * N, Hx, D)[src]
        return rows.view(self.S, self.L, Hx, D).transpose(1, 2)

    def from_rows(self, y: torch.Tensor, like: torch.Tensor, src, dst) -> torch.Tensor:
        """``y [S, Hx, L, D]`` -> a tensor shaped (and strided) like ``like [B, Hx, N, D]``, zeros where no token
        came from (padding)."""
        B, Hx, N, D = like.shape
        flat = like.new_zeros(B * N, Hx, D)
        flat[src] = y.transpose(1, 2).reshape(self.S * self.L, Hx, D)[dst]
        out = torch.empty_like(like)
        out.copy_(flat.view(B, N, Hx, D).transpose(1, 2))
        return out

    def lse_to_rows(self, lse: torch.Tensor, q: torch.Tensor, rows_q: torch.Tensor) -> torch.Tensor:
        """The forward's LSE in query order ``[B, H, >= Q]`` -> the unpacked rows' ``[S, H, lse_len]`` (+inf where
        no query sits: such rows get probability 0 in the backward)."""
        B, H, Q = q.shape[0], q.shape[1], q.shape[2]
        flat = torch.full((self.S * self.L, H), float("inf"), device=q.device, dtype=torch.float32)
        flat[self.q_dst] = lse[:, :, :Q].transpose(1, 2).reshape(B * Q, H)[self.q_src]
        out = torch.full((self.S, H, _lse_len(rows_q)), float("inf"), device=q.device, dtype=torch.float32)
        out[:, :, :self.L] = flat.view(self.S, self.L, H).transpose(1, 2)
        return out

    def lse_from_rows(self, lse_rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The rows' LSE ``[S, H, >= L]`` -> query order ``[B, H, lse_len]`` (+inf at padded queries)."""
        B, H, Q = q.shape[0], q.shape[1], q.shape[2]
        # a fresh buffer, not a view of ``out``: with one row whose length is whole tiles the view would alias
        # the copy into ``out`` (which CUDA refuses)
        flat = torch.full((B * Q, H), float("inf"), device=q.device, dtype=torch.float32)
        flat[self.q_src] = lse_rows[:, :, :self.L].transpose(1, 2).reshape(self.S * self.L, H)[self.q_dst]
        out = torch.full((B, H, _lse_len(q)), float("inf"), device=q.device, dtype=torch.float32)
        out[:, :, :Q] = flat.view(B, Q, H).transpose(1, 2)
        return out


def _plan(seg: torch.Tensor, pos: torch.Tensor, q_index: torch.Tensor):
    """``("rows", (q_start, k_start, q_valid))`` when the layout's rows are the kernels' rows already, else
    ``("unpack", _Unpacked)``. Reads the layout on the host."""
    rows = PPALayout(seg, pos, q_index, 0, seg.shape[-1]).single_sequence_rows()
    return ("rows", rows) if rows is not None else ("unpack", _Unpacked(seg, pos, q_index))


# The ops read the layout on the host (a synchronisation), which a CUDA graph cannot capture: tagged so that
# torch.compile's CUDA graphs ("reduce-overhead") leave them out instead of failing while recording.
_HOST_READS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("ppa_hf::packed_prefill_forward", mutates_args=(), tags=_HOST_READS)
def _packed_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor,
                    q_index: torch.Tensor, pattern_key: list[float], granularity: str, max_distance: int | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    pattern = _pattern(_key(pattern_key, granularity))
    q, k, v = last_contiguous(q), last_contiguous(k), last_contiguous(v)
    kind, plan = _plan(seg, pos, q_index)
    if kind == "rows":
        q_start, k_start, q_valid = plan
        out, lse = _forward(_Ctx(pattern, q, k, q_start, k_start, max_distance), q, k, v, scale)
        if q_valid is not None:  # right padding: padded queries return zeros
            out.mul_(q_valid[:, None, :, None].to(out.dtype))
        return out, lse
    rq = plan.to_rows(q, plan.q_src, plan.q_dst)
    rk, rv = (plan.to_rows(x, plan.key_src, plan.key_dst) for x in (k, v))
    out_rows, lse_rows = _forward(_Ctx(pattern, rq, rk, 0, 0, max_distance), rq, rk, rv, scale)
    return plan.from_rows(out_rows, q, plan.q_src, plan.q_dst), plan.lse_from_rows(lse_rows, q)


@_packed_forward.register_fake
def _(q, k, v, seg, pos, q_index, pattern_key, granularity, max_distance, scale):
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[1], _lse_len(q)), dtype=torch.float32)


@torch.library.custom_op("ppa_hf::packed_prefill_backward", mutates_args=(), tags=_HOST_READS)
def _packed_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                     do: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor, q_index: torch.Tensor,
                     pattern_key: list[float], granularity: str, max_distance: int | None, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pattern = _pattern(_key(pattern_key, granularity))
    q, k, v = last_contiguous(q), last_contiguous(k), last_contiguous(v)
    kind, plan = _plan(seg, pos, q_index)
    if kind == "rows":
        q_start, k_start, q_valid = plan
        if q_valid is not None:  # the forward zeroed these outputs: no gradient flows through them
            do = do * q_valid[:, None, :, None].to(do.dtype)
        return _backward(_Ctx(pattern, q, k, q_start, k_start, max_distance), q, k, v, o, lse, do, scale)
    rq, ro, rdo = (plan.to_rows(x, plan.q_src, plan.q_dst) for x in (q, o, last_contiguous(do)))
    rk, rv = (plan.to_rows(x, plan.key_src, plan.key_dst) for x in (k, v))
    rlse = plan.lse_to_rows(lse, q, rq)
    dq, dk, dv = _backward(_Ctx(pattern, rq, rk, 0, 0, max_distance), rq, rk, rv, ro, rlse, rdo, scale)
    return (plan.from_rows(dq, q, plan.q_src, plan.q_dst), plan.from_rows(dk, k, plan.key_src, plan.key_dst),
            plan.from_rows(dv, v, plan.key_src, plan.key_dst))


@_packed_backward.register_fake
def _(q, k, v, o, lse, do, seg, pos, q_index, pattern_key, granularity, max_distance, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, seg, pos, q_index, *args = inputs
    ctx.save_for_backward(q, k, v, *output, seg, pos, q_index)
    ctx.args = args


def _packed_grad(ctx, do, dlse):
    q, k, v, o, lse, seg, pos, q_index = ctx.saved_tensors
    dq, dk, dv = _packed_backward(q, k, v, o, lse, do, seg, pos, q_index, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


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
    out, _ = _packed_forward(query, key, value, layout.seg, layout.pos, layout.q_index,
                             [p, window, sinks, block_size], granularity, max_distance, scale)
    return out
