"""Plot speedup over dense causal SDPA against length from an attention.csv of benchmarks/run.py.

    python -m benchmarks.plot docs/bench_results/run2_attention/attention.csv docs/speedup_vs_length.png
"""

import csv
import sys
from collections import defaultdict


def main(path, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(path)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, col, title in ((axes[0], "speedup_fwd", "forward"), (axes[1], "speedup_fwd_bwd", "forward + backward")):
        series = defaultdict(list)
        for r in rows:
            if r["method"] == "sdpa_dense_causal" or r.get("error"):
                continue
            label = f"{r['method']} p={float(r['p']):g}" if "dense" not in r["method"] and "window" not in r["method"] \
                else r["method"]
            series[label].append((int(r["L"]), float(r[col])))
        for label, pts in sorted(series.items()):
            pts.sort()
            if len(pts) < 2:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                    linestyle="--" if label.startswith("flex") else "-")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_title(f"speedup vs dense causal SDPA (flash), {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup (x)")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
