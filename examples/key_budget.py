"""Attended keys per query of the token and block patterns (default w=64, B=128, no sinks), for docs/results.md:
the mean over all query positions of a sequence, and the count at the query that answers a retrieval prompt
(position ``L - answer_tokens - 1``: the last prompt token, whose logits give the answer's first token).

    python examples/key_budget.py --lengths 2048 8192 [--answer-tokens 6] [--window 64] [--block-size 128]
        [--sink-tokens 0]

``--answer-tokens 6``: a passkey answer of the embedded SmolLM2 tokenizer (" 12345" is a space and 5 digits).
"""
import argparse

from ppa_hf.pattern import PPAPattern, score_entries
from ppa_hf.recipes.options import add_ppa_arguments, ppa_settings
from ppa_hf.recipes.retrieval import keys_at_query


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--ps", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0])
    parser.add_argument("--answer-tokens", type=int, default=6,
                        help="tokens of the answer after the prompt (the answering query is L - this - 1)")
    add_ppa_arguments(parser, omit=("p", "backend", "granularity"))  # both granularities are tabulated
    args = parser.parse_args(argv)
    try:
        ppa = ppa_settings(args)
    except ValueError as err:
        parser.error(str(err))
    window, sinks, block = ppa["window"], ppa["sink_tokens"], ppa["block_size"]
    print(f"| L | p | token: mean keys/query | block (B={block}): mean keys/query | token: keys at the answering "
          f"query | block: keys at the answering query |")
    print("| --- | --- | --- | --- | --- | --- |")
    for length in args.lengths:
        answer_at = length - args.answer_tokens - 1
        for p in args.ps:
            token = score_entries(length, p, window, sinks) / length
            blocked = int(PPAPattern(p, window, sinks, "block", block).dense(length).sum()) / length
            at_token = keys_at_query(answer_at, p, window, sinks, "token", block)
            at_block = keys_at_query(answer_at, p, window, sinks, "block", block)
            print(f"| {length} | {p:g} | {token:.0f} | {blocked:.0f} | {at_token} | {at_block} |")


if __name__ == "__main__":
    main()
