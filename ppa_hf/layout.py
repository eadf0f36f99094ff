"""Where each token of a forward pass sits inside its own sequence: the :class:`PPALayout`.

The Transformers mask interface (:mod:`ppa_hf.hf.mask`) builds one layout per forward pass instead of a dense
``[B, 1, Q, K]`` mask; every attention op reads positions from it and applies a pattern to them. Plain torch: this
module imports nothing from Transformers.
"""

from __future__ import annotations

import torch



class PPALayout:
    """Token layout of one forward pass, on the absolute kv axis ``[0, T)`` with ``T = kv_offset + kv_length``.

    Attributes:
        seg: ``[B, T]`` long, the sequence each token belongs to (``-1``: padding, never attended).
        pos: ``[B, T]`` long, the token's position inside its sequence (0 = the sequence's first real token).
        q_index: ``[Q]`` long, absolute kv-axis index of each query.
        q_slice: the same indices as a ``slice`` when they are consecutive and known on the host (eager steps), else
            ``None``: :meth:`at_queries` then reads the queries' entries as a view instead of an indexing kernel, and
            ``q_index`` (which may then be passed as ``None``) is made on first use.
        valid: ``[B, T]`` bool, the real tokens (``seg >= 0``).
        kv_offset, kv_length: the keys handed to attention are absolute indices ``kv_offset .. kv_offset+K-1``.

    ``one_sequence_per_row``: the real tokens of each row form one sequence (see :func:`one_sequence_per_row`).

    Building a layout never synchronises with the device (it is built inside compiled decoding steps);
    :meth:`single_sequence_rows` does, unless ``q_start`` says up front that every row is one unpadded sequence
    from kv index 0 whose queries start at position ``q_start`` (the mask interface knows this when there is no
    padding mask and no packing).
    """

    def __init__(self, seg, pos, q_index, kv_offset: int, kv_length: int, q_start: int | None = None,
                 one_sequence_per_row: bool = False, valid: torch.Tensor | None = None, q_slice: slice | None = None):
        if seg is None and (valid is None or not one_sequence_per_row):
            raise ValueError("PPALayout needs seg and pos, or valid with one_sequence_per_row=True")
        if q_index is None and q_slice is None:
            raise ValueError("PPALayout needs q_index or q_slice")
        # with one sequence per row, seg and pos follow from ``valid [B, T]`` (real tokens) and are built on first
        # use: a decoding step's index kernel reads ``valid`` itself, so they are never built there
        self._seg, self._pos, self._valid = seg, pos, valid
        self._q_index, self.q_slice = q_index, q_slice
        # True when each row's real tokens form one sequence (padding anywhere, no packing): a real token's position
        # is then its rank among the row's real tokens (ops use this to skip work)
        self.one_sequence_per_row = bool(one_sequence_per_row)
        self.kv_offset, self.kv_length = int(kv_offset), int(kv_length)
        self.cache: dict = {}  # per-forward derived objects (dense masks, BlockMasks, index lists), one per key
        if q_start is not None:
            self.cache[("single_sequence_rows",)] = (int(q_start), self.kv_offset, None)

    @property
    def seg(self) -> torch.Tensor:
        if self._seg is None:
            self._build_seg_pos()
        return self._seg

    @property
    def pos(self) -> torch.Tensor:
        if self._pos is None:
            self._build_seg_pos()
        return self._pos

    def _build_seg_pos(self) -> None:
        self._seg, self._pos = one_sequence_per_row(self._valid)

    @property
    def q_index(self) -> torch.Tensor:
        if self._q_index is None:
            self._q_index = torch.arange(self.q_slice.start, self.q_slice.stop, device=self.device)
        return self._q_index

    @property
    def valid(self) -> torch.Tensor:
        """``[B, T]`` bool: real tokens."""
        if self._valid is None:
            self._valid = self._seg >= 0
        return self._valid

    # Shape-like attributes so model code that inspects the mask keeps working.
    @property
    def shape(self):
        n_queries = self.q_slice.stop - self.q_slice.start if self.q_slice is not None else int(self.q_index.numel())
        return (self._grid_shape()[0], 1, n_queries, self.kv_length)

    def _grid_shape(self):
        """``(B, T)`` without building ``seg``."""
        return (self._seg if self._seg is not None else self._valid).shape

    @property
    def ndim(self):
        return 4

    @property
    def device(self):
        return (self._seg if self._seg is not None else self._valid).device

    def at_queries(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, ...]`` -> ``[B, Q, ...]``: the entries at the queries' kv indices."""
        return x[:, self.q_slice] if self.q_slice is not None else x[:, self.q_index]

    def q_seg(self):
        return self.at_queries(self.seg)

    def q_pos(self):
        return self.at_queries(self.pos)

    def k_seg(self):
        return self.seg[:, self.kv_offset : self.kv_offset + self.kv_length]

    def k_pos(self):
        return self.pos[:, self.kv_offset : self.kv_offset + self.kv_length]

    def with_position_ids(self, position_ids: torch.Tensor | None) -> "PPALayout":
        """Split packed sequences marked by restarting ``position_ids`` (training without a cache).

        Transformers only detects packing itself when no cache and no padding mask are given; models usually
        create a cache even in training, so the position ids seen by the attention layer are checked too.
        """
        if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != self._grid_shape()[-1]:
            return self
        key = ("position_ids", position_ids.data_ptr(), tuple(position_ids.shape))
        if key not in self.cache:
            pid = position_ids.to(self.device).expand(self._grid_shape()[0], -1)
            self.cache[key] = self
            if bool((pid[:, 1:] <= pid[:, :-1]).any()):
                self.cache[key] = self._relinked(pid)
        return self.cache[key]

    def linked_by_position_ids(self, position_ids: torch.Tensor | None) -> "PPALayout":
        """:meth:`with_position_ids` without a data-dependent branch (for torch.compile): the layout re-linked by the
        position ids whether or not they restart (then the same sequences and positions as this layout)."""
        if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != self._grid_shape()[-1]:
            return self
        return self._relinked(position_ids.to(self.device).expand(self._grid_shape()[0], -1))

    def _relinked(self, pid: torch.Tensor) -> "PPALayout":
        """This layout with a new sequence wherever the position id ``pid [B, T]`` does not grow."""
        valid = self.valid
        prev = previous_valid(valid)
        restart = torch.gather(pid, 1, prev.clamp(min=0)) >= pid
        link = (prev >= 0) & ~restart & (self.seg == torch.gather(self.seg, 1, prev.clamp(min=0)))
        seg, pos = layout_from_links(valid, link)
        return PPALayout(seg, pos, self._q_index, self.kv_offset, self.kv_length, q_slice=self.q_slice)

    def single_sequence_rows(self) -> tuple[int, int, torch.Tensor | None] | None:
        """``(q_start, k_start, q_valid)`` when every row is one sequence starting at kv index 0 (no padding, or
        right padding only), so a token's position equals its kv index; else ``None``.

        Then query row ``r`` sits at position ``q_start + r`` and key column ``c`` at ``k_start + c``; ``q_valid`` is
        ``[B, Q]`` bool when some queries are padding (their output must be zeroed), else ``None``. Cached (one host
        synchronisation per forward pass, none when the layout was built with ``q_start``)."""
        return self.per_forward(("single_sequence_rows",), self._single_sequence_rows)

    def per_forward(self, key, build):
        """``build()``, made once and kept in :attr:`cache` under ``key``: the layout lives for one forward pass, so
        its layers share what it derives (each would otherwise launch the same kernels again)."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def _single_sequence_rows(self):
        if self.q_index.numel() == 0:
            return None
        q_valid = self.q_seg() >= 0
        rows_ok, consecutive, q0, n_real = single_sequence_checks(self.seg, self.valid, self.q_index,
                                                                 q_valid).tolist()  # one host read
        if not (rows_ok and consecutive):
            return None
        return q0, self.kv_offset, None if n_real == q_valid.numel() else q_valid


def single_sequence_checks(seg: torch.Tensor, valid: torch.Tensor, q_index: torch.Tensor,
                           q_valid: torch.Tensor) -> torch.Tensor:
    """The test of :meth:`PPALayout.single_sequence_rows` on the device, no host read: ``[rows_ok, consecutive, q0,
    n_real]`` (long): whether every row of ``seg``/``valid [B, T]`` is one sequence with its real tokens at kv
    indices ``0 .. count-1`` (right padding at most), whether the (non-empty) ``q_index [Q]`` is consecutive, its
    first entry, and the number of real queries (``q_valid [B, Q]``). Callers read it with one ``tolist()``, beside
    anything else they need from the host."""
    idx = torch.arange(seg.shape[-1], device=seg.device)
    last = torch.where(valid, idx, -1).max(dim=-1).values
    rows_ok = (seg.max(dim=-1).values <= 0) & (last + 1 == valid.sum(-1))
    q0 = q_index[0]
    consecutive = (q_index == q0 + torch.arange(q_index.numel(), device=seg.device)).all()
    return torch.stack([rows_ok.all(), consecutive, q0, q_valid.sum()])

def one_sequence_per_row(valid: torch.Tensor):
    """``seg, pos`` (as :func:`layout_from_links`) when every real token continues the sequence of the previous real
    token of its row: one sequence per row, padding anywhere. Five elementwise ops instead of about fifteen (this
    runs once per decoding step)."""
    rank = running_count(valid) - 1
    return torch.where(valid, 0, -1), torch.where(valid, rank, 0)


def previous_valid(valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: index of the last valid token strictly before each index (``-1`` if none)."""
    idx = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    last = running_max(torch.where(valid, idx, -1))
    return torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=-1)


def layout_from_links(valid: torch.Tensor, link: torch.Tensor):
    """Sequences and positions from ``valid [B, T]`` and ``link [B, T]`` (token continues the sequence of the
    previous valid token). Returns ``seg, pos``, both ``[B, T]`` long, ``-1``/``0`` on padding."""
    start = valid & ~link
    seg = torch.where(valid, running_count(start) - 1, -1)
    rank = running_count(valid) - 1  # index among valid tokens
    start_rank = running_max(torch.where(start, rank, -1))
    pos = torch.where(valid, rank - start_rank, 0)
    return seg, pos


# The layout's scans along the kv axis. Under torch.compile they run as opaque custom ops (the aten kernels), not as
# scans Inductor generates: on CUDA (torch 2.11) Inductor's split-scan code generation fails for some of these
# inputs, e.g. a [2, 700] cumsum of a broadcast expression ("list indices must be integers or slices, not NoneType";
# scans over more than 128 elements take that path). Eager calls use torch directly (no dispatcher overhead).
@torch.library.custom_op("ppa_hf::running_count", mutates_args=())
def _running_count(flags: torch.Tensor) -> torch.Tensor:
    return flags.long().cumsum(-1)


@_running_count.register_fake
def _(flags):
    return torch.empty(flags.shape, dtype=torch.long, device=flags.device)


@torch.library.custom_op("ppa_hf::running_max", mutates_args=())
def _running_max(values: torch.Tensor) -> torch.Tensor:
    return values.cummax(dim=-1).values


@_running_max.register_fake
def _(values):
    return torch.empty_like(values)


def running_count(flags: torch.Tensor) -> torch.Tensor:
    """``[..., T]`` long: how many of ``flags`` are true up to and including each index (a cumsum)."""
    return _running_count(flags) if torch.compiler.is_compiling() else flags.cumsum(-1, dtype=torch.long)


def running_max(values: torch.Tensor) -> torch.Tensor:
    """``[..., T]``: the largest of ``values`` up to and including each index (a cummax)."""
    return _running_max(values) if torch.compiler.is_compiling() else values.cummax(dim=-1).values

