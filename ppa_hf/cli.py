"""``ppa-hf`` command line. Each subcommand lives in its own module exposing ``add_parser(subparsers)``,
which registers the subcommand and sets ``func`` (called with the parsed args, returns an exit code).

Only the module of the subcommand being run is imported (the others, and torch, are not): ``ppa-hf --help``
lists the subcommands from :data:`SUBCOMMANDS` alone and starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module that adds it, its one-line help; tests/test_cli_fast.py checks it is the module's own)
SUBCOMMANDS = {
    "mask": ("ppa_hf.recipes.cli_mask", "print the counts of one sequence's PPA mask (--out: draw it as a PNG)"),
    "demo": ("ppa_hf.recipes.demo", "the main job on the embedded SmolLM2-135M-Instruct"),
    "eval": ("ppa_hf.recipes.cli_eval", "evaluate on GSM8K, MATH-500 or perplexity"),
    "sweep": ("ppa_hf.recipes.cli_sweep", "evaluate (and optionally fine-tune) over a list of p; CSV and plot"),
}


def build_parser(command: str | None = "all") -> argparse.ArgumentParser:
    """The parser with every subcommand's options (``"all"``), or with those of ``command`` alone (its module
    imported) and only the name and one-line help of the others (``None``: of every subcommand)."""
    parser = argparse.ArgumentParser(prog="ppa-hf", description="Power-based Partial Attention for Transformers")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if command in (name, "all"):
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # the top level has only --help
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, non-zero exit
        print(f"ppa-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
