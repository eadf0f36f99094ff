"""Perplexity over long texts, in fixed-length windows (every token of a window is scored once)."""

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


def token_windows(tokenizer, text: str, context: int, max_windows: int | None = None) -> torch.Tensor:
    """``[N, context]`` long: consecutive non-overlapping windows of the tokenized text (the tail is dropped)."""
    if context < 2:
        raise ValueError(f"context={context} is too short; context must be an integer >= 2")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // context
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of context={context}")
    return ids[: n * context].view(n, context)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False, desc: str = "ppl"):
    """Summed next-token negative log-likelihood and token count over ``windows [N, T]``."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    total, count = 0.0, 0
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    return total, count


def perplexity(model, tokenizer, text: str, context: int = 1024, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = False, desc: str = "ppl") -> dict:
    """``{"nll": per-token loss, "ppl": exp(nll), "tokens": scored tokens, "windows": N, "context": T}``."""
    windows = token_windows(tokenizer, text, context, max_windows)
    total, count = window_nll(model, windows, batch_size, progress, desc)
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count, "windows": int(windows.shape[0]), "context": context}
