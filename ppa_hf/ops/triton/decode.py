"""Fused gathered decoding in Triton: each query reads only its attended key rows through an index list
(``w + T**p`` rows, not ``T``); gather + scores + softmax + PV in one kernel, split over the rows (split-K) so that
batch 1 fills the GPU, then a small combine kernel."""

from __future__ import annotations

import functools
import math

import torch

from .common import (LOG2E, dot_precision, env_config, interpreted, last_contiguous, launch, run_fitting, tl, triton,
                     unsupported_reason)

if triton is not None:

    # The integer arguments change with the batch size, the cache length and the split count: not specialising on
    # their values (Triton otherwise compiles a new variant for a value of 1 or a multiple of 16) keeps the first
    # step at a new batch size or length free of compilation.
    _DECODE_INTS = ["sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn", "sib", "siq", "scb", "sob", "soh",
                    "som", "HKV", "G", "NQ", "n_split"]

    @triton.jit(do_not_specialize=_DECODE_INTS)
    def _decode_kernel(Q, K, V, IDX, CNT, OP, MP, LP, TICKETS, O, scale_log2,
                       sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sib, siq, scb, sob, soh, som,
                       HKV, G, NQ, n_split,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, GP: tl.constexpr, SINGLE: tl.constexpr,
                       COMBINE: tl.constexpr, PRECISION: tl.constexpr):
        """One program per (batch row, KV head, query) and split: the query heads of one KV head attend that
        split's share of the row's listed keys (the ``count`` entries shared evenly by the splits). ``SINGLE``
        (one split): the output is written normalised; else the partial results go to ``OP/MP/LP``, combined by
        :func:`_combine_kernel`, or (``COMBINE``) by the last split of each program to finish: each split takes a
        ticket from ``TICKETS[pid]`` (zero before the launch, reset to zero by that last split), so a layer costs
        one launch instead of two. ``PRECISION``: the dots' input precision (``"ieee"`` for float32 inputs: exact,
        where Triton's default would round them to tf32)."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        qi = pid % NQ
        hk = (pid // NQ) % HKV
        b = pid // (NQ * HKV)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        gmask = offs_g < G
        heads = hk * G + offs_g
        q = tl.load(Q + b.to(tl.int64) * sqb + heads[:, None].to(tl.int64) * sqh + qi * sqm + offs_d[None, :],
                    mask=gmask[:, None], other=0.0)
        n = tl.load(CNT + b * scb + qi)
        chunk = tl.cdiv(tl.cdiv(n, n_split), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n)
        m_i = tl.full([GP], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, HEAD_DIM], dtype=tl.float32)
        k_ptr = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        v_ptr = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        idx_ptr = IDX + b.to(tl.int64) * sib + qi * siq
        for start in range(lo, hi, BLOCK_N):
            offs = start + offs_n
            j = tl.load(idx_ptr + offs, mask=offs < hi, other=-1).to(tl.int64)
            valid = j >= 0  # -1: not attended (see ppa_hf.ops.gather.decode_index)
            j = tl.maximum(j, 0)
            k = tl.load(k_ptr + j[:, None] * skn + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + j[:, None] * svn + offs_d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        if SINGLE:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(O + b.to(tl.int64) * sob + heads[:, None].to(tl.int64) * soh + qi * som + offs_d[None, :],
                     out.to(O.dtype.element_ty), mask=gmask[:, None])
        else:
            row = (b * HKV * G + heads) * NQ + qi  # [GP] flat (b, h, q)
            tl.store(OP + (row[:, None] * n_split + split).to(tl.int64) * HEAD_DIM + offs_d[None, :], acc,
                     mask=gmask[:, None])
            tl.store(MP + row * n_split + split, m_i, mask=gmask)
            tl.store(LP + row * n_split + split, l_i, mask=gmask)
            if COMBINE:
                # every thread's partial stores before the ticket (the atomic is acq_rel at GPU scope): the split that
                # draws the last ticket sees all the others' partials
                tl.debug_barrier()
                ticket = tl.atomic_add(TICKETS + pid, 1, sem="acq_rel", scope="gpu")
                if ticket == n_split - 1:
                    _combine_heads(OP, MP, LP, O, b, qi, heads, row, gmask, n_split, sob, soh, som, HEAD_DIM, GP)
                    tl.store(TICKETS + pid, 0)

    @triton.jit
    def _combine_heads(OP, MP, LP, O, b, qi, heads, row, gmask, n_split, sob, soh, som, HEAD_DIM: tl.constexpr,
                       GP: tl.constexpr):
        """The normalised output of the heads ``heads`` (rows ``row`` of the partials) from their ``n_split``
        partial results. Loads bypass L1 (``.cg``): the partials were written by other programs of this launch."""
        offs_d = tl.arange(0, HEAD_DIM)
        m_max = tl.load(MP + row * n_split, mask=gmask, other=-1.0e30, cache_modifier=".cg")
        for s in range(1, n_split):
            m_max = tl.maximum(m_max, tl.load(MP + row * n_split + s, mask=gmask, other=-1.0e30, cache_modifier=".cg"))
        num = tl.zeros([GP, HEAD_DIM], dtype=tl.float32)
        den = tl.zeros([GP], dtype=tl.float32)
        for s in range(n_split):
            w = tl.exp2(tl.load(MP + row * n_split + s, mask=gmask, other=-1.0e30, cache_modifier=".cg") - m_max)
            den += w * tl.load(LP + row * n_split + s, mask=gmask, other=0.0, cache_modifier=".cg")
            part = tl.load(OP + (row[:, None] * n_split + s).to(tl.int64) * HEAD_DIM + offs_d[None, :],
                           mask=gmask[:, None], other=0.0, cache_modifier=".cg")
            num += part * w[:, None]
        out = num / tl.where(den == 0.0, 1.0, den)[:, None]
        tl.store(O + b.to(tl.int64) * sob + heads[:, None].to(tl.int64) * soh + qi * som + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=gmask[:, None])

    @triton.jit(do_not_specialize=["n_split", "H", "NQ", "sob", "soh", "som"])
    def _combine_kernel(OP, MP, LP, O, n_split, H, NQ, sob, soh, som,
                        HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
        row = tl.program_id(0)  # flat (b, h, q)
        qi = row % NQ
        h = (row // NQ) % H
        b = row // (NQ * H)
        offs_s = tl.arange(0, SPLITS)
        smask = offs_s < n_split
        offs_d = tl.arange(0, HEAD_DIM)
        m = tl.load(MP + row * n_split + offs_s, mask=smask, other=-1.0e30)
        l = tl.load(LP + row * n_split + offs_s, mask=smask, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.exp2(m - m_max)
        w = tl.where(smask, w, 0.0)
        acc = tl.load(OP + (row * n_split + offs_s[:, None]).to(tl.int64) * HEAD_DIM + offs_d[None, :],
                      mask=smask[:, None], other=0.0)
        num = tl.sum(acc * w[:, None], 0)
        den = tl.sum(l * w, 0)
        out = num / tl.where(den == 0.0, 1.0, den)
        tl.store(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + qi * som + offs_d, out.to(O.dtype.element_ty))


MAX_SPLITS = 64  # split-K parts of one (row, KV head, query) at most
# The decode kernel's launch: (programs per multiprocessor the splits aim at, BLOCK_N, num_warps, num_stages), by the
# number of programs before splitting (batch x KV heads x queries), measured on an H200 with 32 query / 8 KV heads,
# head size 64, bf16, p = 0.75, 32k and 128k keys (benchmarks/results/tune_decode.csv, one knob at a time around each
# entry; ms per call at 32k / 128k, token pattern): 8 programs (batch 1): (2, 64, 4, 3), 2 warps were slower (0.032 /
# 0.044 against 0.029 / 0.038); 64 programs (batch 8): (4, 64, 2, 3), 0.046 / 0.113 against 0.071 / 0.175 with the
# batch-1 entry; 256 programs (batch 32): (2, 64, 2, 3), 0.125 / 0.317 against 0.165 / 0.425. Counts in between were
# not measured.
DECODE_DEFAULT = (2, 64, 4, 3)
DECODE_TABLE = ((256, (2, 64, 2, 3)), (64, (4, 64, 2, 3)))  # (from this many programs on, configuration)
_decode_cfg: tuple | None = None  # set_decode_config's, or PPA_TRITON_DECODE's, for every launch
_decode_env_read = False


def decode_config(programs: int = 1) -> tuple[int, int, int, int]:
    """The decode kernel's launch configuration ``(programs per multiprocessor, BLOCK_N, num_warps, num_stages)`` for
    ``programs`` (batch x KV heads x queries): the first entry of :data:`DECODE_TABLE` whose count ``programs``
    reaches, else :data:`DECODE_DEFAULT`, unless ``PPA_TRITON_DECODE="PPSM,BN,warps,stages"`` (read once) or
    :func:`set_decode_config` fixes one for every launch. The split count gives about ``PPSM`` programs per
    multiprocessor (at most :data:`MAX_SPLITS` splits, at least ``BLOCK_N`` listed keys per split)."""
    global _decode_cfg, _decode_env_read
    if not _decode_env_read:
        env = env_config("PPA_TRITON_DECODE", None)
        if env is not None and _decode_cfg is None:
            _decode_cfg = _checked_decode_config(env, "PPA_TRITON_DECODE")
        _decode_env_read = True  # (a bad value raises at every call, never falls back to the table)
    if _decode_cfg is not None:
        return _decode_cfg
    return next((config for least, config in DECODE_TABLE if programs >= least), DECODE_DEFAULT)


def decode_splits(programs: int, listed: int, device, per_sm: int, block_n: int) -> int:
    """Splits per program: about ``per_sm`` programs per multiprocessor, at least ``block_n`` of the ``listed`` keys
    each, at most :data:`MAX_SPLITS`."""
    return max(1, min(-(-per_sm * _num_sms(str(device)) // programs), -(-listed // block_n), MAX_SPLITS))


def set_decode_config(config: tuple | None) -> None:
    """Fix the decode kernel's launch configuration for every launch (see :func:`decode_config`); ``None``: back to
    the environment or the measured defaults."""
    global _decode_cfg, _decode_env_read
    _decode_cfg = None if config is None else _checked_decode_config(config, "config")
    _decode_env_read = config is not None  # None: PPA_TRITON_DECODE is read again


def _checked_decode_config(config, name: str) -> tuple[int, int, int, int]:
    config = tuple(int(x) for x in config)
    power = lambda x: x > 0 and x & (x - 1) == 0  # noqa: E731
    if (len(config) != 4 or config[0] < 1 or not (power(config[1]) and config[1] >= 16) or not power(config[2])
            or config[3] < 1):
        raise ValueError(f"{name}={config}: the decode kernel's launch takes (programs per multiprocessor >= 1, "
                         "BLOCK_N a power of two >= 16, num_warps a power of two, num_stages >= 1)")
    return config


@functools.lru_cache(maxsize=None)
def _num_sms(device: str) -> int:
    if torch.device(device).type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def triton_decode_attention(query, key, value, index: torch.Tensor, count: torch.Tensor,
                            scale: float | None = None, check: bool = True) -> torch.Tensor:
    """``query [B, H, Q, D]`` against ``key``/``value [B, Hkv, T, D]`` (a KV cache) reading only the rows
    ``index [B or 1, Q, N]`` (kv indices, -1 for none; the first ``count [B or 1, Q]`` entries of each row are read,
    see :func:`ppa_hf.ops.gather.decode_index`). Returns ``[B, H, Q, D]``; a query with no key gets zeros.

    Eager calls launch the kernels directly (least host time per layer); under torch.compile the same work runs as
    the custom op ``ppa_hf::triton_decode``, which Dynamo does not trace into and CUDA graphs capture. ``check=False``:
    the caller has already checked the inputs with :func:`~ppa_hf.ops.triton.unsupported_reason`."""
    if check:
        reason = unsupported_reason(query, key, value)
        if reason is not None:
            raise ValueError(f"the Triton decode kernel cannot run: {reason}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling():
        return torch.ops.ppa_hf.triton_decode(query, key, value, index, count, scale)
    return _decode(query, key, value, index, count, scale)


def _decode_output(query: torch.Tensor) -> torch.Tensor:
    """``[B, H, Q, D]`` laid out as ``[B, Q, H, D]``: what attention hands back to the model (after ``transpose(1,
    2)``) is then already contiguous, so no copy kernel runs after the decode kernel (one launch less per layer)."""
    B, H, NQ, D = query.shape
    return query.new_empty(B, NQ, H, D).transpose(1, 2)


def _workspace_size(rows: int, splits: int, head_dim: int) -> int:
    """float32 elements of a workspace holding the splits' partial outputs, maxima and denominators."""
    n16 = -(-rows * splits // 4) * 4  # segments start 16-byte aligned (alignment is part of Triton's cache key)
    return rows * splits * head_dim + 2 * n16


def _workspace_views(work: torch.Tensor, rows: int, splits: int, head_dim: int):
    """``(partial outputs [rows, splits, D], maxima [rows, splits], denominators [rows, splits])`` in ``work``."""
    n = rows * splits
    n16 = -(-n // 4) * 4
    return (work[: n * head_dim].view(rows, splits, head_dim), work[n * head_dim: n * head_dim + n].view(rows, splits),
            work[n * head_dim + n16: n * head_dim + n16 + n].view(rows, splits))


class _StreamBuffers:
    """Scratch memory of the eager decode path, one set per CUDA stream (kernels on one stream run in order, so the
    layers of a step reuse it; two streams never share it): the partial outputs, maxima and denominators of the
    splits (float32, as views of one workspace) and the int32 tickets of the fused combine, zero between launches.
    The views are kept per shape: a decoding step's layers all ask for the same ones."""

    def __init__(self):
        self._buffers: dict = {}  # (device, stream) -> [workspace, tickets, {(rows, splits, D): views}]

    def get(self, device: torch.device, rows: int, splits: int, head_dim: int, programs: int):
        """``(partial outputs [rows, splits, D], maxima [rows, splits], denominators [rows, splits], tickets)``."""
        stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
        entry = self._buffers.get((device, stream))
        if entry is None:
            entry = self._buffers[(device, stream)] = [None, None, {}]
        views = entry[2].get((rows, splits, head_dim))
        if views is None or entry[1].numel() < programs:
            size = _workspace_size(rows, splits, head_dim)
            if entry[0] is None or entry[0].numel() < size:
                entry[0] = torch.empty(max(size, 2 * (0 if entry[0] is None else entry[0].numel())), device=device,
                                       dtype=torch.float32)
                entry[2].clear()  # views of the old workspace
            if entry[1] is None or entry[1].numel() < programs:
                entry[1] = torch.zeros(max(programs, 2 * (0 if entry[1] is None else entry[1].numel())),
                                       device=device, dtype=torch.int32)
                entry[2].clear()
            views = entry[2][(rows, splits, head_dim)] = (*_workspace_views(entry[0], rows, splits, head_dim),
                                                           entry[1])
        return views


_BUFFERS = _StreamBuffers()


def _decode(query, key, value, index, count, scale: float, fused: bool = True) -> torch.Tensor:
    """``fused``: one launch, the partial results combined by the last split of each program (eager calls, with
    per-stream scratch memory); else a combine kernel after the decode kernel and fresh scratch memory per call (the
    custom op: safe to capture in a CUDA graph)."""
    key, value, query = last_contiguous(key), last_contiguous(value), last_contiguous(query)
    index = index if index.dtype == torch.int32 else index.to(torch.int32)
    count = count if count.dtype == torch.int32 else count.to(torch.int32)
    config = decode_config(query.shape[0] * key.shape[1] * query.shape[2])
    if interpreted(query.device):
        config = (config[0], 16) + config[2:]
    return run_fitting("decode", config, (1,),
                       lambda fitting: _decode_launch(query, key, value, index, count, scale, fused, fitting),
                       query.device, (query.shape[-1], query.dtype))


def _decode_launch(query, key, value, index, count, scale: float, fused: bool, config: tuple) -> torch.Tensor:
    """:func:`_decode` in the launch configuration ``config`` (see :func:`decode_config`)."""
    B, H, NQ, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    N = index.shape[-1]
    programs = B * Hkv * NQ
    per_sm, block_n, warps, stages = config
    # about per_sm programs per multiprocessor; each split takes an even share of its row's listed keys
    splits = decode_splits(programs, N, query.device, per_sm, block_n)
    out = _decode_output(query)
    rows = B * H * NQ
    if splits == 1:
        op = mp = lp = tickets = out  # not touched
    elif fused:
        op, mp, lp, tickets = _BUFFERS.get(query.device, rows, splits, D, programs)
    else:  # one fresh workspace for the partial outputs, maxima and denominators (one allocation, not three)
        work = torch.empty(_workspace_size(rows, splits, D), device=query.device, dtype=torch.float32)
        op, mp, lp = _workspace_views(work, rows, splits, D)
        tickets = out  # not touched
    gp = max(16, 1 << (G - 1).bit_length())  # the query heads of one KV head, padded to a power of two
    combine = fused and splits > 1
    # the kernel's specialisation in a few cheap values (see launch): every pointer 16-byte aligned, every integer
    # (sizes and strides, at most the largest tensor's element count) 32-bit; otherwise the full key is computed
    aligned = (query.data_ptr() | key.data_ptr() | value.data_ptr() | index.data_ptr() | count.data_ptr()
               | out.data_ptr() | op.data_ptr() | mp.data_ptr() | lp.data_ptr() | tickets.data_ptr()) % 16 == 0
    small = max(key.numel(), value.numel(), query.numel(), index.numel()) < 2**31
    precision = dot_precision(query.dtype)
    fast_key = (("decode", query.device.index, query.dtype, key.dtype, value.dtype, D, block_n, gp, splits == 1,
                 combine, precision, warps, stages) if aligned and small else None)
    launch(_decode_kernel, (programs, splits),
           (query, key, value, index, count, op, mp, lp, tickets, out, scale * LOG2E,
            query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2),
            index.stride(0) if index.shape[0] > 1 else 0, index.stride(1), count.stride(0) if count.shape[0] > 1 else 0,
            out.stride(0), out.stride(1), out.stride(2), Hkv, G, NQ, splits),
           dict(HEAD_DIM=D, BLOCK_N=block_n, GP=gp, SINGLE=splits == 1, COMBINE=combine,
                PRECISION=precision), fast_key=fast_key,
           num_warps=warps, num_stages=stages)
    if splits > 1 and not fused:  # SPLITS fixed at the largest split count: one compiled combine kernel for every shape
        launch(_combine_kernel, (rows,), (op, mp, lp, out, splits, H, NQ, out.stride(0), out.stride(1), out.stride(2)),
               dict(HEAD_DIM=D, SPLITS=MAX_SPLITS), num_warps=4)
    return out


@torch.library.custom_op("ppa_hf::triton_decode", mutates_args=())
def _decode_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, index: torch.Tensor, count: torch.Tensor,
               scale: float) -> torch.Tensor:
    return _decode(query, key, value, index, count, scale, fused=False)


@_decode_op.register_fake
def _(query, key, value, index, count, scale):
    return _decode_output(query)
