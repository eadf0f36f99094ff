"""The command line starts without torch or Transformers; ``ppa-hf mask`` writes a file only when asked to."""

import subprocess
import sys

from conftest import REPO_ROOT, subprocess_env

HEAVY = ("torch", "transformers", "numpy", "matplotlib")


def imported_after(code: str) -> set:
    """The HEAVY modules a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=subprocess_env(),
                         cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(eval(out.stdout.strip().splitlines()[-1]))


def test_import_of_the_cli_and_the_package_pull_no_torch_or_transformers():
    assert imported_after("import ppa_hf, ppa_hf.cli") == set()


def test_top_level_help_pulls_no_torch_or_transformers():
    code = ("import contextlib, io\nfrom ppa_hf.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass")
    assert imported_after(code) == set()


def test_the_lazy_listing_equals_the_subcommands_own_help():
    from ppa_hf.cli import build_parser

    assert build_parser(None).format_help() == build_parser().format_help()


def test_transformers_import_registers_ppa_after_a_light_import():
    code = ("import ppa_hf\nfrom transformers import AttentionInterface\n"
            "assert 'ppa' in AttentionInterface._global_mapping")
    assert {"torch", "transformers"} <= imported_after(code)


def test_mask_without_out_prints_counts_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from ppa_hf.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["mask", "--p", "0.5", "--length", "64", "--window", "4"]) == 0
    out = capsys.readouterr().out
    assert "ppa_p0.5_w4_s0: L=64, attended pairs=" in out and "wrote" not in out
    assert list(tmp_path.iterdir()) == []
    assert main(["mask", "--p", "0.5", "--length", "64", "--window", "4", "--out", "pics/m.png"]) == 0
    assert (tmp_path / "pics" / "m.png").stat().st_size > 0


def test_mask_help_says_what_the_default_does(capsys):
    from ppa_hf.cli import main

    try:
        main(["mask", "--help"])
    except SystemExit:
        pass
    assert "default: none; only the counts are printed" in " ".join(capsys.readouterr().out.split())
