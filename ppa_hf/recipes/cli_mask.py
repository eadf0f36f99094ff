"""``ppa-hf mask``: picture and counts of a pattern."""

from __future__ import annotations

from .options import add_ppa_arguments, ppa_settings


def add_parser(sub):
    parser = sub.add_parser("mask", help="draw the PPA mask of one sequence and print its counts")
    add_ppa_arguments(parser, omit=("backend",))  # a picture of the pattern: no attention path involved
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--out", default="mask.png", help="PNG path")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..pattern import PPAPattern, check_int, far_offsets
    from .plots import save_mask_png

    ppa = ppa_settings(args)
    p = ppa["p"]
    length = check_int(args.length, "--length", 1)
    pattern = PPAPattern(p, ppa["window"], ppa["sink_tokens"], ppa["granularity"], ppa["block_size"])
    save_mask_png(args.out, length, p, pattern.window, pattern.sink_tokens, pattern.granularity, pattern.block_size)
    pairs = int(pattern.dense(length).sum())
    print(f"{pattern.name}: L={length}, attended pairs={pairs}, causal pairs={length * (length + 1) // 2}")
    print(f"far offsets < {length}: {far_offsets(p, length)[:24].tolist()}{' ...' if len(far_offsets(p, length)) > 24 else ''}")
    print(f"wrote {args.out}")
    return 0
