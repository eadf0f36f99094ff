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


def plot_metric_vs_p(path: str, series: dict, ylabel: str, title: str, logy: bool = False) -> str:
    """Line plot of ``{label: [(p, value), ...]}`` against ``p``; p = 0 (sliding window) and p = 1 (full
    attention) are marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, points in series.items():
        points = sorted(points)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    ax.axvline(0.0, color="grey", ls=":", lw=1)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    if logy:
        ax.set_yscale("log")
    # label the two ends below the axis, where no data point sits
    ax.annotate("sliding window", (0.0, 0.0), xycoords=("data", "axes fraction"), xytext=(2, 3),
                textcoords="offset points", fontsize=8, color="grey")
    ax.annotate("full", (1.0, 0.0), xycoords=("data", "axes fraction"), xytext=(-2, 3),
                textcoords="offset points", ha="right", fontsize=8, color="grey")
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
