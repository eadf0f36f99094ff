"""Pictures: the mask of a pattern, and metric-against-p curves."""

from __future__ import annotations

import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_mask_png(path: str, length: int, p: float, window: int = 64, sink_tokens: int = 0,
                  granularity: str = "token", block_size: int = 128) -> str:
    """Draw the ``[length, length]`` mask of one sequence (black = attended) titled with its parameters."""
    from ..pattern import PPAPattern

    pattern = PPAPattern(p, window, sink_tokens, granularity, block_size)
    mask = pattern.dense(length).numpy()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
    ax.imshow(mask, cmap="Greys", interpolation="nearest")
    pairs = int(mask.sum())
    title = f"{pattern.name}  L={length}\n{pairs} attended pairs ({pairs / (length * (length + 1) / 2):.1%} of causal)"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def log_ticks(low: float, high: float, most: int = 10) -> list[float]:
    """Round values for a log axis labelled in plain numbers, from the largest one <= ``low`` to the smallest one
    >= ``high`` (so the lowest and the highest point both sit between labelled ticks): 1, 1.2, 1.5, 2, 2.5, 3, 4,
    5, 6, 8 times a power of ten, or a coarser set when that gives more than ``most``."""
    import math

    powers = range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 2)
    for mantissas in ((1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8), (1, 2, 3, 5), (1, 2, 5), (1,)):  # finest that fits
        values = sorted(float(f"{m}e{e}") for e in powers for m in mantissas)  # exact decimal values
        first, last = max(v for v in values if v <= low), min(v for v in values if v >= high)
        ticks = [v for v in values if first <= v <= last]
        if len(ticks) <= most:
            return ticks
    step = -(-len(ticks) // most)
    return ticks[::step] if (len(ticks) - 1) % step == 0 else ticks[::step] + [ticks[-1]]


def plot_metric_vs_p(path: str, series: dict, ylabel: str, title: str, logy: bool = False,
                     label_points: bool = False) -> str:
    """Line plot of ``{label: [(p, value), ...]}`` against ``p``; p = 0 (sliding window) and p = 1 (full
    attention) are named under the axis. ``logy``: log scale with plain-number ticks at or beyond the lowest and
    the highest point. ``label_points``: each point's value written beside it (once where series meet)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    written = set()
    for label, points in series.items():
        points = sorted(points)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
        for x, y in points if label_points else ():
            text = f"{y:.1f}" if abs(y) >= 10 else f"{y:.3g}"
            if (x, text) not in written:  # one label where several series share a point (p = 1: full attention)
                written.add((x, text))
                first = x == points[0][0]  # left of every other point goes right of it, clear of the axis
                ax.annotate(text, (x, y), xytext=(5 if first else -5, 5), textcoords="offset points",
                            ha="left" if first else "right", fontsize=7)
    ax.axvline(0.0, color="grey", ls=":", lw=1)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    values = [y for points in series.values() for _, y in points]
    if logy and values and min(values) > 0:
        ax.set_yscale("log")
        ticks = log_ticks(min(values), max(values))
        ax.set_ylim(ticks[0] / 1.04, ticks[-1] * 1.04)
        ax.minorticks_off()
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    # the two ends named in the x tick labels, under the axis, where no point or label sits
    ticks = [0.0, 0.25, 0.5, 0.75, 1.0]
    ax.set_xticks(ticks, ["0\nsliding window", "0.25", "0.5", "0.75", "1\nfull"])
    ax.set_xlim(-0.06, 1.06)
    ax.set_xlabel("p")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
