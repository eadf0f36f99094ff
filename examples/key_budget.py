"""Mean attended keys per query of the token and block patterns (default w=64, B=128, no sinks), for
docs/results.md.

    python examples/key_budget.py --lengths 2048 8192 [--window 64] [--block-size 128] [--sink-tokens 0]
"""
import argparse

from ppa_hf.pattern import PPAPattern, score_entries
from ppa_hf.recipes.options import add_ppa_arguments, ppa_settings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--ps", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0])
    add_ppa_arguments(parser, omit=("p", "backend", "granularity"))  # both granularities are tabulated
    args = parser.parse_args(argv)
    try:
        ppa = ppa_settings(args)
    except ValueError as err:
        parser.error(str(err))
    window, sinks, block = ppa["window"], ppa["sink_tokens"], ppa["block_size"]
    print(f"| L | p | token: mean keys/query | block (B={block}): mean keys/query |")
    print("| --- | --- | --- | --- |")
    for length in args.lengths:
        for p in args.ps:
            token = score_entries(length, p, window, sinks) / length
            blocked = int(PPAPattern(p, window, sinks, "block", block).dense(length).sum()) / length
            print(f"| {length} | {p:g} | {token:.0f} | {blocked:.0f} |")


if __name__ == "__main__":
    main()
