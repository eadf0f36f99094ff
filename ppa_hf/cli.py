"""``ppa-hf`` command line. Each subcommand lives in its own module exposing ``add_parser(subparsers)``,
which registers the subcommand and sets ``func`` (called with the parsed args, returns an exit code)."""

from __future__ import annotations

import argparse
import importlib
import sys

# module (inside ppa_hf) -> its subcommands are added in this order
SUBCOMMAND_MODULES = [
    "ppa_hf.recipes.cli_mask",
    "ppa_hf.recipes.demo",
    "ppa_hf.recipes.cli_eval",
    "ppa_hf.recipes.cli_sweep",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppa-hf", description="Power-based Partial Attention for Transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, non-zero exit
        print(f"ppa-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
