"""The ``"ppa"`` entry of Transformers' ``AttentionMaskInterface``.

Transformers calls the mask interface once per forward pass (not once per layer). Instead of a dense
``[B, 1, Q, K]`` tensor we return a :class:`PPALayout`: where each token sits inside its own sequence
(padding, packed sequences, cache offsets resolved once). Each attention layer then builds the pattern it
needs from the layout and its own ``p`` (so per-layer ``p`` works) through :mod:`ppa_hf.pattern`.
"""

from __future__ import annotations

import torch

from .settings import fill_defaults, read_settings


class PPALayout:
    """Token layout of one forward pass, on the absolute kv axis ``[0, T)`` with ``T = kv_offset + kv_length``.

    Attributes:
        seg: ``[B, T]`` long, the sequence each token belongs to (``-1``: padding, never attended).
        pos: ``[B, T]`` long, the token's position inside its sequence (0 = the sequence's first real token).
        q_index: ``[Q]`` long, absolute kv-axis index of each query.
        kv_offset, kv_length: the keys handed to attention are absolute indices ``kv_offset .. kv_offset+K-1``.
        contiguous: every row holds at most one sequence, as consecutive real tokens (left/right padding only);
            then a key's kv index is ``row_start + pos`` and index distance equals position distance.
        row_start: ``[B]`` long, absolute index of each row's first real token (meaningful when ``contiguous``).
    """

    def __init__(self, seg, pos, q_index, kv_offset: int, kv_length: int):
        self.seg, self.pos, self.q_index = seg, pos, q_index
        self.kv_offset, self.kv_length = int(kv_offset), int(kv_length)
        valid = seg >= 0
        n_seg = seg.max(dim=-1).values + 1
        idx = torch.arange(seg.shape[-1], device=seg.device)
        first = torch.where(valid, idx, seg.shape[-1]).min(dim=-1).values
        last = torch.where(valid, idx, -1).max(dim=-1).values
        count = valid.sum(-1)
        self.row_start = torch.where(count > 0, first, 0)
        self.contiguous = bool(((n_seg <= 1) & ((count == 0) | (last - first + 1 == count))).all())
        self.cache: dict = {}  # per-(settings, path) derived objects: dense masks, BlockMasks, gather indices

    # Shape-like attributes so model code that inspects the mask keeps working.
    @property
    def shape(self):
        return (self.seg.shape[0], 1, int(self.q_index.numel()), self.kv_length)

    @property
    def ndim(self):
        return 4

    @property
    def device(self):
        return self.seg.device

    def q_seg(self):
        return self.seg[:, self.q_index]

    def q_pos(self):
        return self.pos[:, self.q_index]

    def k_seg(self):
        return self.seg[:, self.kv_offset : self.kv_offset + self.kv_length]

    def k_pos(self):
        return self.pos[:, self.kv_offset : self.kv_offset + self.kv_length]

    def with_position_ids(self, position_ids: torch.Tensor | None) -> "PPALayout":
        """Split packed sequences marked by restarting ``position_ids`` (training without a cache).

        Transformers only detects packing itself when no cache and no padding mask are given; models usually
        create a cache even in training, so the position ids seen by the attention layer are checked too.
        """
        if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != self.seg.shape[-1]:
            return self
        key = ("position_ids", position_ids.data_ptr(), tuple(position_ids.shape))
        if key not in self.cache:
            pid = position_ids.to(self.seg.device).expand(self.seg.shape[0], -1)
            self.cache[key] = self
            if bool((pid[:, 1:] <= pid[:, :-1]).any()):
                valid = self.seg >= 0
                prev = _previous_valid(valid)
                restart = torch.gather(pid, 1, prev.clamp(min=0)) >= pid
                link = (prev >= 0) & ~restart & (self.seg == torch.gather(self.seg, 1, prev.clamp(min=0)))
                seg, pos = layout_from_links(valid, link)
                self.cache[key] = PPALayout(seg, pos, self.q_index, self.kv_offset, self.kv_length)
        return self.cache[key]


def _previous_valid(valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: index of the last valid token strictly before each index (``-1`` if none)."""
    idx = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    last = torch.where(valid, idx, -1).cummax(dim=-1).values
    return torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=-1)


def layout_from_links(valid: torch.Tensor, link: torch.Tensor):
    """Sequences and positions from ``valid [B, T]`` and ``link [B, T]`` (token continues the sequence of the
    previous valid token). Returns ``seg, pos``, both ``[B, T]`` long, ``-1``/``0`` on padding."""
    start = valid & ~link
    seg = torch.where(valid, start.long().cumsum(-1) - 1, -1)
    rank = valid.long().cumsum(-1) - 1  # index among valid tokens
    start_rank = torch.where(start, rank, -1).cummax(dim=-1).values
    pos = torch.where(valid, rank - start_rank, 0)
    return seg, pos


def _refuse_non_causal(mask_function, device):
    zero, one = torch.tensor(0, device=device), torch.tensor(1, device=device)
    if bool(mask_function(zero, zero, zero, one)):
        raise ValueError(
            "attn_implementation='ppa' supports causal self-attention only, but this model asked for a "
            "non-causal (bidirectional or cross-attention) mask; PPA will not run with the wrong mask"
        )


def ppa_mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                       mask_function=None, attention_mask: torch.Tensor | None = None, device="cpu",
                       config=None, **kwargs) -> PPALayout:
    """Build the :class:`PPALayout` of this forward pass (signature of Transformers' mask interfaces)."""
    if isinstance(attention_mask, PPALayout):  # prepared ahead, e.g. by generate() with a static cache
        return attention_mask
    if config is not None:
        read_settings(config, 0)  # fail early on a missing or invalid setting, before any layer runs
        fill_defaults(config)
    total = int(kv_offset) + int(kv_length)
    if attention_mask is None:
        valid = torch.ones(batch_size, total, dtype=torch.bool, device=device)
    else:
        valid = attention_mask.to(device=device, dtype=torch.bool)[:, :total]
        if valid.shape[-1] < total:  # static caches: slots not yet written are not real tokens
            valid = torch.nn.functional.pad(valid, (0, total - valid.shape[-1]), value=False)
    if mask_function is not None and total > 1:
        _refuse_non_causal(mask_function, device)
    prev = _previous_valid(valid)
    link = prev >= 0
    if mask_function is not None and total > 1:
        # Transformers' own mask function knows about packed sequences (position ids that restart):
        # a token continues a sequence iff it may attend the previous real token.
        b = torch.arange(batch_size, device=device)[:, None]
        j = torch.arange(total, device=device)[None, :].expand(batch_size, -1)
        allowed = mask_function(b, torch.zeros_like(b), j, prev.clamp(min=0))
        link = link & torch.as_tensor(allowed, device=device).expand_as(link)
    seg, pos = layout_from_links(valid, link)
    q_index = torch.arange(q_length, device=device) + q_offset
    return PPALayout(seg, pos, q_index, kv_offset, kv_length)
