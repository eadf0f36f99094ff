"""The main job: patch the embedded SmolLM2-135M-Instruct to PPA and see what p costs.

Perplexity of the Python documentation text (``pydoc_data.topics``) at several ``p``, with and without
4 sink tokens; a table, a CSV and a PNG plot; then one short generated answer at ``p = 0.75``.

    python -m ppa_hf.recipes.demo            # or: ppa-hf demo, or: make demo
    python -m ppa_hf.recipes.demo --replot outputs/demo/perplexity_vs_p.csv   # only redraw the PNG
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time

DEFAULT_PS = (1.0, 0.875, 0.75, 0.5, 0.0)
DEFAULT_SINKS = (0, 4)
QUESTION = "What is the capital of France? Answer in one short sentence."


def add_arguments(parser):
    from ppa_hf.recipes.options import add_ppa_arguments

    parser.add_argument("--ps", type=float, nargs="+", default=list(DEFAULT_PS), help="values of p to measure")
    parser.add_argument("--sinks", type=int, nargs="+", default=list(DEFAULT_SINKS), help="sink-token counts")
    add_ppa_arguments(parser, omit=("p", "sink_tokens"))  # p and sinks are swept: --ps, --sinks
    parser.add_argument("--context", type=int, default=2048, help="tokens per perplexity window")
    parser.add_argument("--windows", type=int, default=4, help="number of windows scored")
    parser.add_argument("--text", default="pydoc", help="'pydoc', 'stdlib' or a text file")
    parser.add_argument("--out-dir", default="outputs/demo")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--replot", metavar="CSV", default=None,
                        help="only redraw the PNG from a perplexity_vs_p.csv written earlier (beside it; no model run)")


def add_parser(sub):
    parser = sub.add_parser("demo", help="the main job on the embedded SmolLM2-135M-Instruct")
    add_arguments(parser)
    parser.set_defaults(func=run)


def plot_csv(csv_path: str, png_path: str | None = None) -> str:
    """The demo's figure from its CSV: perplexity against p, one line per sink-token count, log axis. Written to
    ``png_path`` (default: beside the CSV, same name)."""
    from ppa_hf.models import DEFAULT_MODEL_NAME
    from ppa_hf.recipes.plots import plot_metric_vs_p

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    series = {}
    for row in rows:
        series.setdefault(f"{row['sink_tokens']} sink tokens", []).append((float(row["p"]), float(row["ppl"])))
    return plot_metric_vs_p(png_path or os.path.splitext(csv_path)[0] + ".png", series, "perplexity",
                            f"{DEFAULT_MODEL_NAME}, zero-shot PPA (w={rows[0]['window']}), context {rows[0]['context']}",
                            logy=True, label_points=True)


def run(args) -> int:
    if args.replot:
        print(f"wrote {plot_csv(args.replot)}")
        return 0
    import torch

    import ppa_hf
    from ppa_hf.models import DEFAULT_MODEL_NAME, load_model
    from ppa_hf.pattern import check_int, check_p
    from ppa_hf.recipes.options import ppa_settings
    from ppa_hf.recipes.perplexity import load_text, perplexity

    ps = [check_p(p, "--ps") for p in args.ps]
    sinks = [check_int(s, "--sinks", 0) for s in args.sinks]
    ppa = ppa_settings(args)  # window, backend, granularity, block size
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    print(f"Loading {DEFAULT_MODEL_NAME} (GGUF, de-quantized to float32) ...", flush=True)
    model, tokenizer = load_model()
    model.eval()
    text = load_text(args.text)
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    from tqdm.auto import tqdm

    grid = [(p, s) for s in sinks for p in ps]
    for p, s in tqdm(grid, desc="perplexity sweep", unit="setting"):
        ppa_hf.apply(model, p=p, sink_tokens=s, **ppa)
        t0 = time.time()
        result = perplexity(model, tokenizer, text, context=args.context, max_windows=args.windows,
                            progress=True, desc=f"p={p:g} sinks={s}")
        rows.append({"p": p, "sink_tokens": s, "window": args.window, "context": args.context,
                     "tokens": result["tokens"], "nll": round(result["nll"], 5), "ppl": round(result["ppl"], 4),
                     "seconds": round(time.time() - t0, 1)})

    csv_path = os.path.join(args.out_dir, "perplexity_vs_p.csv")
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print()
    print(f"Perplexity of {DEFAULT_MODEL_NAME} on '{args.text}' ({rows[0]['tokens']} tokens, "
          f"windows of {args.context}), PPA window w={args.window}")
    print(f"{'p':>6} | " + " | ".join(f"ppl, {s} sinks" for s in sinks))
    print("-" * (9 + 17 * len(sinks)))
    for p in ps:
        cells = [next(r["ppl"] for r in rows if r["p"] == p and r["sink_tokens"] == s) for s in sinks]
        print(f"{p:>6g} | " + " | ".join(f"{c:>13.3f}" for c in cells))
    png_path = plot_csv(csv_path)
    print(f"\nwrote {csv_path}\nwrote {png_path}")

    ppa_hf.apply(model, p=0.75, sink_tokens=0, **ppa)
    messages = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()
    print(f"\nGenerated at p=0.75 (greedy, KV cache):\nQ: {QUESTION}\nA: {answer}")
    print(f"\nDone in {time.time() - started:.0f} s on {platform.machine()} "
          f"({torch.get_num_threads()} threads, torch {torch.__version__}).")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
