"""``ppa-hf mask``: picture and counts of a pattern."""

from __future__ import annotations


def add_parser(sub):
    parser = sub.add_parser("mask", help="draw the PPA mask of one sequence and print its counts")
    parser.add_argument("--p", type=str, required=True, help="power p in [0, 1] (a float or a fraction like 1/3)")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sink-tokens", type=int, default=0)
    parser.add_argument("--granularity", choices=["token", "block"], default="token")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--out", default="mask.png", help="PNG path")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..pattern import PPAPattern, check_int, check_p, far_offsets
    from .plots import save_mask_png

    p = check_p(args.p, "--p")
    length = check_int(args.length, "--length", 1)
    pattern = PPAPattern(p, args.window, args.sink_tokens, args.granularity, args.block_size)
    save_mask_png(args.out, length, p, pattern.window, pattern.sink_tokens, args.granularity, pattern.block_size)
    pairs = int(pattern.dense(length).sum())
    print(f"{pattern.name}: L={length}, attended pairs={pairs}, causal pairs={length * (length + 1) // 2}")
    print(f"far offsets < {length}: {far_offsets(p, length)[:24].tolist()}{' ...' if len(far_offsets(p, length)) > 24 else ''}")
    print(f"wrote {args.out}")
    return 0
