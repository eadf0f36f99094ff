"""Context parallelism: one example's sequence split over the ranks of a process group.

Each rank of a context-parallel (CP) group holds one contiguous chunk of the sequence (``L / N`` tokens): it embeds
them, runs the MLPs on them and computes attention for its own queries only. Attention needs every earlier key, so
each layer all-gathers the chunks' keys and values over the group (:func:`gather_sequence`; its backward
reduce-scatters the key/value gradients back to the ranks that own them). The queries then sit in the middle of
the gathered keys: the layout of the forward pass (:class:`ContextParallelLayout`) is the whole sequence's, with
this rank's global query positions, so the PPA pattern (window, far offsets, sinks) is evaluated on global
positions across chunk borders and the keys after the chunk are masked by causality, on every attention path.

Memory: each rank holds the gathered keys and values of one layer, ``O(L)``, and its attention scores / masks for
``L / N`` queries against ``L`` keys; the MLPs, embeddings, logits and activations are split ``N`` ways.

Run-time state (a process group) never goes into the model config: a :class:`ContextParallel` is created once per
run and passed explicitly to :func:`shard_batch`, which puts it into that forward pass's layout.

    context = ContextParallel.create(2)               # after torch.distributed is initialised (accelerate does it)
    inputs, targets = shard_batch(batch, context, model.config)
    logits = model(**inputs, use_cache=False).logits  # [B, L / N, V]: this rank's chunk
    loss_sum = cross_entropy(logits, targets, reduction="sum")   # sum over the chunk; reduce over the group
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..layout import PPALayout


class ContextParallel:
    """This process's place in context parallelism.

    The ``world_size`` processes form ``world_size // size`` CP groups of ``size`` consecutive ranks (ranks
    ``[g * size, (g + 1) * size)`` share the sequences of data-parallel replica ``g``). Attributes: ``group`` (the
    process group of this rank's CP group), ``size``, ``rank`` (place in the CP group, i.e. which chunk),
    ``data_parallel_size`` and ``data_parallel_rank`` (which replica).
    """

    def __init__(self, group, size: int, rank: int, data_parallel_size: int, data_parallel_rank: int):
        self.group, self.size, self.rank = group, size, rank
        self.data_parallel_size, self.data_parallel_rank = data_parallel_size, data_parallel_rank

    @classmethod
    def create(cls, size: int, name: str = "context_parallel") -> "ContextParallel":
        """Create the CP groups of ``size`` ranks (every process must call this, in the same order). Needs an
        initialised default process group whose size ``size`` divides; ``name`` is used in error messages."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ValueError(f"{name}={size!r} is not allowed; {name} must be an integer >= 2 (1: no context "
                             "parallelism)")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"{name}={size} needs torch.distributed initialised with several processes (launch with "
                             "accelerate launch or torchrun)")
        world, global_rank = dist.get_world_size(), dist.get_rank()
        if world % size:
            raise ValueError(f"{name}={size} does not divide the number of processes ({world}); it must be a "
                             f"divisor of {world} that is >= 2")
        own = None
        for first in range(0, world, size):  # every rank creates every group (torch.distributed requires it)
            group = dist.new_group(list(range(first, first + size)))
            if first <= global_rank < first + size:
                own = group
        return cls(own, size, global_rank % size, world // size, global_rank // size)

    def bounds(self, length: int) -> tuple[int, int]:
        """``(start, end)``: the global token indices of this rank's chunk of a ``length``-token axis (a multiple of
        ``size``)."""
        chunk = length // self.size
        return self.rank * chunk, (self.rank + 1) * chunk


class _GatherSequence(torch.autograd.Function):
    """All-gather of ``[B, H, T, D]`` chunks along the token axis; the backward reduce-scatters (sums) the
    gradient of the whole ``[B, H, N*T, D]`` so that each rank gets the gradient of its own chunk from every rank's
    queries."""

    @staticmethod
    def forward(ctx, chunk: torch.Tensor, group, size: int, rank: int) -> torch.Tensor:
        ctx.group, ctx.size, ctx.rank = group, size, rank
        chunk = chunk.contiguous()
        parts = [torch.empty_like(chunk) for _ in range(size)]
        dist.all_gather(parts, chunk, group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        parts = [part.contiguous() for part in grad.chunk(ctx.size, dim=2)]
        own = torch.empty_like(parts[ctx.rank])
        dist.reduce_scatter(own, parts, group=ctx.group)
        return own, None, None, None


def gather_sequence(chunk: torch.Tensor, context: ContextParallel) -> torch.Tensor:
    """``chunk [B, H, T, D]`` of every rank of the CP group, concatenated in rank order: ``[B, H, size * T, D]``.
    Differentiable (the backward reduce-scatters the gradient to the chunks' owners)."""
    return _GatherSequence.apply(chunk, context.group, context.size, context.rank)


class ContextParallelLayout(PPALayout):
    """The layout of a whole sequence (keys ``[0, L)``) whose queries are one rank's chunk ``[start, end)``.

    The attention function (:func:`ppa_hf.hf.dispatch.ppa_attention_forward`) sees this class and gathers the
    chunk's keys and values over the CP group (:meth:`gather_kv`) before choosing a path; every path reads query and
    key positions from the layout, so the pattern is evaluated on global positions."""

    def __init__(self, layout: PPALayout, context: ContextParallel):
        super().__init__(layout.seg, layout.pos, layout._q_index, layout.kv_offset, layout.kv_length,
                         q_slice=layout.q_slice)
        self.cache = layout.cache  # what the layout already knows (e.g. that every row is one unpadded sequence)
        self.context = context

    def with_position_ids(self, position_ids: torch.Tensor | None) -> "ContextParallelLayout":
        """The model passes this chunk's position ids; the whole sequence's (packed sequences included) were applied
        by :func:`shard_batch` already."""
        return self

    def gather_kv(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``key``/``value [B, Hkv, T, D]`` of this rank's chunk -> ``[B, Hkv, L, D]`` of the whole sequence."""
        expected = self.kv_length // self.context.size
        if key.shape[2] != expected:
            raise ValueError(f"context parallelism: this rank's chunk has {key.shape[2]} keys but the layout splits "
                             f"{self.kv_length} keys over {self.context.size} ranks ({expected} each); pass the "
                             "input_ids of shard_batch")
        return gather_sequence(key, self.context), gather_sequence(value, self.context)


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """``labels [B, L]`` (``labels[:, t]`` is the target of the logits at ``t - 1``) -> ``targets [B, L]`` with
    ``targets[:, t]`` the target of the logits at ``t`` (-100 at the last position: no next token). Shifting before
    the sequence is split counts every next-token target exactly once across the chunks."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)


def shard_batch(batch: dict, context: ContextParallel | None, config) -> tuple[dict, torch.Tensor]:
    """This rank's share of a batch: ``(model keyword arguments, targets [B, T])``.

    ``batch``: ``input_ids [B, L]``, ``labels [B, L]`` (see :func:`shift_targets`), optionally ``attention_mask
    [B, L]`` (right or left padding) and ``position_ids [B, L]`` (restarting ids mark packed sequences). Without
    ``context`` the whole batch is returned (``T = L``). With it, the batch is padded at the end to a multiple of
    ``context.size`` (padding is masked and has no target) and ``T = L / size``; the keyword arguments hold this
    rank's ``input_ids``, its global ``position_ids`` (RoPE sees the tokens' true positions) and, as
    ``attention_mask``, a :class:`ContextParallelLayout` of the whole batch built by the PPA mask interface from
    ``config`` (so the pattern's tables are built for length ``L`` before the first layer). A model that does not run
    ``attn_implementation="ppa"`` is refused (its attention would not gather the keys)."""
    from .mask import ppa_mask_interface

    input_ids, mask = batch["input_ids"], batch.get("attention_mask")
    targets = shift_targets(batch["labels"])
    if context is None:
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if "position_ids" in batch:
            inputs["position_ids"] = batch["position_ids"]
        return inputs, targets
    implementation = getattr(config, "_attn_implementation", None)
    if implementation != "ppa":
        raise ValueError(f"context parallelism runs through attn_implementation='ppa' (the attention function gathers "
                         f"the keys); this model's config has {implementation!r}: load it with "
                         "attn_implementation='ppa' or call ppa_hf.apply(model, p=...) first")
    B, L = input_ids.shape
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
    extra = -L % context.size
    if extra:
        if mask is None:
            mask = torch.ones_like(input_ids)
        input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=0)
        mask = torch.nn.functional.pad(mask, (0, extra), value=0)
        targets = torch.nn.functional.pad(targets, (0, extra), value=-100)
        last = position_ids[:, -1:]
        position_ids = torch.cat([position_ids, last + torch.arange(1, extra + 1, device=last.device)], dim=-1)
        L += extra
    start, end = context.bounds(L)
    layout = ppa_mask_interface(B, end - start, L, q_offset=start, kv_offset=0, attention_mask=mask,
                                device=input_ids.device, config=config)
    layout = layout.with_position_ids(position_ids)  # packed sequences: restarting ids split them
    inputs = {"input_ids": input_ids[:, start:end], "position_ids": position_ids[:, start:end],
              "attention_mask": ContextParallelLayout(layout, context)}
    return inputs, targets[:, start:end]
