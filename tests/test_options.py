"""The PPA options shared by every command line (ppa_hf/recipes/options.py): one declaration, the plugin's own
choices, validation errors that name the option, and every command built from it."""

import argparse
import importlib.util

import pytest

from conftest import REPO_ROOT
from ppa_hf.hf.settings import BACKEND_ALIASES, BACKENDS, GRANULARITIES
from ppa_hf.recipes.options import PPA_NAMES, add_ppa_arguments, ppa_settings

PPA_OPTIONS = ["--p", "--window", "--sink-tokens", "--backend", "--granularity", "--block-size"]


def parse(argv, **kwargs):
    return add_ppa_arguments(argparse.ArgumentParser(), **kwargs).parse_args(argv)


def test_defaults_validation_and_keep_saved():
    assert ppa_settings(parse(["--p", "3/4"])) == {"p": 0.75, "window": 64, "sink_tokens": 0, "backend": "auto",
                                                   "granularity": "token", "block_size": 128}
    assert ppa_settings(parse([], defaults={"p": 0.5, "window": 8}))["window"] == 8
    assert ppa_settings(parse(["--p", "1", "--backend", "naive"]))["backend"] == "sdpa_mask"  # the alias
    assert ppa_settings(parse([], keep_saved=True)) == dict.fromkeys(PPA_NAMES)  # None: keep the saved value
    assert ppa_settings(parse(["--block-size", "32"], keep_saved=True, omit=("p",))) == {
        "window": None, "sink_tokens": None, "backend": None, "granularity": None, "block_size": 32}
    for argv, message in [(["--p", "2"], "--p=2"), (["--p", "x"], "--p='x'"), (["--p", "1", "--window", "0"],
                          "--window=0"), (["--p", "1", "--sink-tokens", "-1"], "--sink-tokens=-1"),
                          (["--p", "1", "--block-size", "0"], "--block-size=0")]:
        with pytest.raises(ValueError, match=message) as err:
            ppa_settings(parse(argv))
        assert "must be" in str(err.value)  # and says what is allowed
    with pytest.raises(SystemExit):  # the plugin has no default p: without one given here --p is required
        parse([])
    with pytest.raises(SystemExit):
        parse(["--p", "1", "--granularity", "tile"])
    with pytest.raises(ValueError, match="unknown PPA setting"):
        add_ppa_arguments(argparse.ArgumentParser(), omit=("sinks",))


def _subcommand_parsers():
    """Every command line of the package and examples: name -> parser."""
    from ppa_hf.cli import build_parser
    from ppa_hf.recipes.training import build_parser as finetune_parser

    found = {"finetune": finetune_parser()}
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update({f"ppa-hf {name}": sub for name, sub in action.choices.items()})
    spec = importlib.util.spec_from_file_location("results_example", REPO_ROOT / "examples" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    for action in results.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update({f"results {name}": sub for name, sub in action.choices.items()})
    return found


def test_every_command_takes_the_shared_options():
    parsers = _subcommand_parsers()
    expected = {  # which PPA options each command has (the others are swept or do not apply)
        "finetune": PPA_OPTIONS, "ppa-hf eval": PPA_OPTIONS, "ppa-hf sweep": PPA_OPTIONS[1:],
        "ppa-hf mask": [o for o in PPA_OPTIONS if o != "--backend"],
        "ppa-hf demo": ["--window", "--backend", "--granularity", "--block-size"],
        "results zeroshot": ["--window", "--backend", "--block-size"], "results scurve": PPA_OPTIONS[1:],
    }
    assert set(expected) <= set(parsers)
    for name, options in expected.items():
        actions = {o: a for a in parsers[name]._actions for o in a.option_strings}
        assert [o for o in PPA_OPTIONS if o in actions] == options, name
        if "--backend" in actions:
            assert tuple(actions["--backend"].choices) == BACKENDS + tuple(BACKEND_ALIASES), name
        if "--granularity" in actions:
            assert tuple(actions["--granularity"].choices) == GRANULARITIES, name
    finetune = {o: a for a in parsers["finetune"]._actions for o in a.option_strings}
    assert finetune["--p"].default == "0.75" and finetune["--block-size"].default == 128


def test_no_hand_written_choices_left():
    """The choices of --backend / --granularity come from ppa_hf.hf.settings, never a copied list."""
    files = [*(REPO_ROOT / "ppa_hf" / "recipes").glob("*.py"), REPO_ROOT / "ppa_hf" / "cli.py",
             *(REPO_ROOT / "examples").glob("*.py")]
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "choices=" in line:
                assert not any(f'"{word}"' in line for word in (*BACKENDS, *GRANULARITIES)), f"{path}:{number}"


def test_mask_command_error_names_the_option(tmp_path, capsys):
    from ppa_hf.cli import main

    out = tmp_path / "m.png"
    assert main(["mask", "--p", "0.5", "--granularity", "block", "--block-size", "0", "--out", str(out)]) == 2
    assert "--block-size=0" in capsys.readouterr().err and not out.exists()
    assert main(["mask", "--p", "3/4", "--length", "64", "--window", "8", "--granularity", "block", "--block-size",
                 "16", "--out", str(out)]) == 0
    assert "block" in capsys.readouterr().out and out.read_bytes()[:4] == b"\x89PNG"
