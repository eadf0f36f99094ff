"""Perplexity over long texts, in fixed-length windows, consecutive or overlapping (strided); each token is
scored at most once."""

from __future__ import annotations

import math
import os

import torch


def pydoc_text() -> str:
    """The Python documentation topics shipped with CPython (``pydoc_data.topics``), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def stdlib_source_text(max_chars: int = 2_000_000) -> str:
    """Concatenated CPython standard-library source (``.py`` files of the running interpreter), fixed order."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as handle:
                parts.append(handle.read())
            total += len(parts[-1])
            if total >= max_chars:
                break
    return "\n\n".join(parts)[:max_chars]


TEXTS = {"pydoc": pydoc_text, "stdlib": stdlib_source_text}


def load_text(source: str | None) -> str:
    """``None``/``"pydoc"``: pydoc topics; ``"stdlib"``: standard-library source; otherwise a text file path."""
    if source is None:
        source = "pydoc"
    if source in TEXTS:
        return TEXTS[source]()
    if not os.path.isfile(source):
        raise FileNotFoundError(f"text file {source!r} does not exist (or use 'pydoc' / 'stdlib')")
    with open(source, encoding="utf-8") as handle:
        return handle.read()


def token_windows(tokenizer, text: str, context: int, stride: int | None = None,
                  max_windows: int | None = None) -> torch.Tensor:
    """``[N, context]`` long: windows of the tokenized text starting every ``stride`` tokens (``None``: every
    ``context``, i.e. consecutive and non-overlapping); a tail shorter than a window is dropped."""
    from ..pattern import check_int

    context = check_int(context, "--context", 2)
    stride = context if stride is None else check_int(stride, "--stride", 1)
    if stride > context:  # a gap between windows would leave tokens unscored
        raise ValueError(f"--stride={stride} is larger than --context={context}; stride must be in [1, context]")
    if max_windows is not None:
        check_int(max_windows, "--max-windows", 1)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < context:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of --context={context}")
    windows = ids.unfold(0, context, stride)  # [N, context], N = (len - context) // stride + 1
    return windows[:max_windows] if max_windows is not None else windows


@torch.no_grad()
def perplexity(model, tokenizer, text: str, context: int = 1024, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = False, desc: str = "ppl", stride: int | None = None) -> dict:
    """Per-token loss of ``text`` under ``model``, in windows of ``context`` tokens starting every ``stride``.

    Each token is scored at most once, by the first window whose end covers it: with ``stride=None`` (or
    ``stride == context``) the windows are consecutive and each scores its ``context - 1`` next-token targets;
    with ``stride < context`` each later window scores only its last ``stride`` tokens, so every one of them
    sees at least ``context - stride`` tokens before it. ``batch_size`` windows go through ``model`` at once.

    Under a multi-process launch the batches of windows are shared out (:mod:`~ppa_hf.recipes.sharding`: batch
    ``k`` to process ``k % num_processes``) and the per-batch losses are gathered and summed in window order, so
    the result is the single-process one, to the bit; every process returns it.

    Returns ``{"nll": loss per scored token, "ppl": exp(nll), "tokens": scored tokens, "windows": N,
    "context": context, "stride": stride, "num_processes": P, "windows_per_process": [...]}``.
    """
    from tqdm.auto import tqdm

    from .sharding import (gather_in_order, is_main_process, items_per_process, my_batches, num_processes,
                           run_everywhere)

    windows = token_windows(tokenizer, text, context, stride, max_windows)
    context = windows.shape[1]
    stride = context if stride is None else int(stride)
    # targets t of a window [B, context-1] predict token t + 1; a later window skips the targets its predecessor
    # scored: those before offset `later` (0 when the windows do not overlap)
    later = max(context - stride - 1, 0)
    device = next(model.parameters()).device
    count = windows.shape[0]
    mine = my_batches(list(range(count)), batch_size)
    losses = []  # (batch number, [(summed loss, scored targets) of each group]): summed in batch order below
    bar = tqdm(total=sum(map(len, mine)), desc=desc, unit="window", disable=not (progress and is_main_process()),
               leave=False)

    def run_mine():
        for rows_of_batch in mine:
            first = rows_of_batch[0]
            batch = windows[first : first + len(rows_of_batch)].to(device)  # [B, context]
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # [B, context-1, V]
            targets = batch[:, 1:]
            # rows grouped by their first scored target (only window 0 differs), one loss call per group
            offsets = [0 if first + row == 0 else later for row in range(batch.shape[0])]
            groups = []
            for offset in sorted(set(offsets)):
                rows = [row for row, o in enumerate(offsets) if o == offset]
                if len(rows) == batch.shape[0]:
                    rows = slice(None)
                group_logits, group_targets = logits[rows, offset:], targets[rows, offset:]
                loss = torch.nn.functional.cross_entropy(group_logits.reshape(-1, group_logits.shape[-1]),
                                                         group_targets.reshape(-1), reduction="sum")
                groups.append((float(loss), group_targets.numel()))
            losses.append((first // batch_size, groups))
            bar.update(len(rows_of_batch))
        bar.close()
        return losses

    losses = run_everywhere(run_mine)
    total, scored = 0.0, 0
    for groups in gather_in_order(losses, -(-count // batch_size)):
        for loss, targets in groups:
            total += loss
            scored += targets
    nll = total / scored
    return {"nll": nll, "ppl": math.exp(nll), "tokens": scored, "windows": int(count), "context": context,
            "stride": stride, "num_processes": num_processes(), "windows_per_process": items_per_process(count,
                                                                                                     batch_size)}
