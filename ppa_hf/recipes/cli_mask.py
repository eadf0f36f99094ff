"""``ppa-hf mask``: picture and counts of a pattern."""

from __future__ import annotations

from .options import add_ppa_arguments, ppa_settings


def add_parser(sub):
    parser = sub.add_parser("mask", help="print the counts of one sequence's PPA mask (--out: draw it as a PNG)",
                            description="Print the counts of one sequence's PPA mask; --out PATH also draws it "
                                        "as a PNG.")
    add_ppa_arguments(parser, omit=("backend",))  # a picture of the pattern: no attention path involved
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--out", default=None,
                        help="PNG path to draw the mask to (default: none; only the counts are printed)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..pattern import PPAPattern, check_int, far_offsets

    ppa = ppa_settings(args)
    p = ppa["p"]
    length = check_int(args.length, "--length", 1)
    pattern = PPAPattern(p, ppa["window"], ppa["sink_tokens"], ppa["granularity"], ppa["block_size"])
    pairs = int(pattern.dense(length).sum())
    print(f"{pattern.name}: L={length}, attended pairs={pairs}, causal pairs={length * (length + 1) // 2}")
    print(f"far offsets < {length}: {far_offsets(p, length)[:24].tolist()}{' ...' if len(far_offsets(p, length)) > 24 else ''}")
    if args.out:  # a picture only when asked for: no file lands in the working directory by default
        from .plots import save_mask_png

        save_mask_png(args.out, length, p, pattern.window, pattern.sink_tokens, pattern.granularity,
                      pattern.block_size)
        print(f"wrote {args.out}")
    return 0
