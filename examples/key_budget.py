"""Mean attended keys per query of the token and block patterns (w=64, B=128, no sinks), for docs/results.md.

    python examples/key_budget.py --lengths 2048 8192
"""
import argparse

from ppa_hf.pattern import PPAPattern, score_entries


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--ps", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0])
    args = parser.parse_args()
    print("| L | p | token: mean keys/query | block (B=128): mean keys/query |")
    print("| --- | --- | --- | --- |")
    for length in args.lengths:
        for p in args.ps:
            token = score_entries(length, p, 64) / length
            block = int(PPAPattern(p, 64, 0, "block", 128).dense(length).sum()) / length
            print(f"| {length} | {p:g} | {token:.0f} | {block:.0f} |")


if __name__ == "__main__":
    main()
