#!/usr/bin/env python
"""Compare two fine-tuning loss curves (train_log.jsonl written by examples/finetune.py, or CSV with
``step`` and ``loss`` columns): the steps both logs have, max |loss_a - loss_b|, the step where it occurs,
and mean |difference|.

    python examples/compare_loss_curves.py runs/gpu1/train_log.jsonl runs/gpu2/train_log.jsonl --tolerance 0.02

Exit code 0; 1 when --tolerance is given and exceeded; 2 on bad input (missing file, no common steps).
Use it to check that a 2-GPU run follows the 1-GPU curve with the same global batch.
"""

import argparse
import csv
import json
import os
import sys


def read_curve(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r}: no such log file")
    rows = []
    with open(path) as handle:
        if path.endswith(".csv"):
            rows = list(csv.DictReader(handle))
        else:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise ValueError(f"{path!r} line {number}: not JSON") from None
    curve = {}
    for row in rows:
        if "step" not in row or "loss" not in row:
            raise ValueError(f"{path!r}: rows need 'step' and 'loss' fields, found {sorted(row)}")
        curve[int(row["step"])] = float(row["loss"])
    return curve


def compare(a: dict, b: dict) -> dict:
    steps = sorted(set(a) & set(b))
    if not steps:
        raise ValueError("the two logs have no step in common")
    diffs = {s: abs(a[s] - b[s]) for s in steps}
    worst = max(steps, key=lambda s: diffs[s])
    return {"common_steps": len(steps), "first_step": steps[0], "last_step": steps[-1],
            "max_abs_diff": diffs[worst], "at_step": worst, "mean_abs_diff": sum(diffs.values()) / len(steps),
            "only_in_a": len(set(a) - set(b)), "only_in_b": len(set(b) - set(a))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_a")
    parser.add_argument("log_b")
    parser.add_argument("--tolerance", type=float, default=None, help="fail (exit 1) above this max |difference|")
    args = parser.parse_args(argv)
    try:
        result = compare(read_curve(args.log_a), read_curve(args.log_b))
    except (ValueError, FileNotFoundError) as err:
        print(f"compare_loss_curves: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    print(f"{result['common_steps']} common steps ({result['first_step']}..{result['last_step']}): "
          f"max |loss difference| {result['max_abs_diff']:.6g} at step {result['at_step']}, "
          f"mean {result['mean_abs_diff']:.6g}")
    if args.tolerance is not None and result["max_abs_diff"] > args.tolerance:
        print(f"exceeds --tolerance {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
