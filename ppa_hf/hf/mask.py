"""The ``"ppa"`` entry of Transformers' ``AttentionMaskInterface``.

Transformers calls the mask interface once per forward pass (not once per layer). Instead of a dense
``[B, 1, Q, K]`` tensor it gets a :class:`~ppa_hf.layout.PPALayout`: where each token sits inside its own sequence
(padding, packed sequences, cache offsets resolved once). Each attention layer then applies its own pattern to the
layout (so per-layer ``p`` works).
"""

from __future__ import annotations

import torch
from transformers.masking_utils import causal_mask_function

from ..layout import PPALayout, layout_from_links, previous_valid
from .settings import fill_defaults, layer_patterns, read_settings


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
    """Build the :class:`PPALayout` of this forward pass (signature of Transformers' mask interfaces).

    No host synchronisation and no data-dependent Python, so a compiled decoding step traces through it."""
    if isinstance(attention_mask, PPALayout):  # prepared ahead, e.g. by generate() with a static cache
        return attention_mask
    total = int(kv_offset) + int(kv_length)
    if config is not None:  # fail early on a missing or invalid setting, before any layer runs
        if torch.compiler.is_compiling():
            read_settings(config, 0)
        else:  # every layer's settings, and its tables for this length, so a compiled step only reads them
            for pattern in layer_patterns(config):
                pattern.prime(total, device)
        fill_defaults(config)
    if attention_mask is None:
        valid = torch.ones(batch_size, total, dtype=torch.bool, device=device)
    else:
        valid = attention_mask.to(device=device, dtype=torch.bool)[:, :total]
        if valid.shape[-1] < total:  # static caches: slots not yet written are not real tokens
            valid = torch.nn.functional.pad(valid, (0, total - valid.shape[-1]), value=False)
    plain_causal = mask_function is None or mask_function is causal_mask_function
    if not plain_causal and total > 1 and not torch.compiler.is_compiling():
        _refuse_non_causal(mask_function, device)  # (a compiled step was checked by its eager first call)
    if isinstance(q_offset, int):  # the layout reads queries through the slice (q_index is made if a path asks)
        q_index, q_slice = None, slice(q_offset, q_offset + q_length)
    else:  # a tensor or symbolic offset (compiled steps)
        q_index, q_slice = torch.arange(q_length, device=device) + q_offset, None
    # no padding mask and the plain causal mask: every row is one unpadded sequence, known without looking
    q_start = q_offset if attention_mask is None and plain_causal and q_slice is not None else None
    if plain_causal or total <= 1:  # every real token continues its row's sequence: seg and pos follow from valid
        return PPALayout(None, None, q_index, kv_offset, kv_length, q_start=q_start, one_sequence_per_row=True,
                         valid=valid, q_slice=q_slice)
    prev = previous_valid(valid)
    # Transformers' own mask function knows about packed sequences (position ids that restart):
    # a token continues a sequence iff it may attend the previous real token.
    b = torch.arange(batch_size, device=device)[:, None]
    j = torch.arange(total, device=device)[None, :].expand(batch_size, -1)
    allowed = mask_function(b, torch.zeros_like(b), j, prev.clamp(min=0))
    link = (prev >= 0) & torch.as_tensor(allowed, device=device).expand_as(prev)
    seg, pos = layout_from_links(valid, link)
    return PPALayout(seg, pos, q_index, kv_offset, kv_length, q_slice=q_slice)
