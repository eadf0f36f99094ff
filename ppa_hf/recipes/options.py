"""The PPA options of every command line, declared and validated in one place.

    parser = argparse.ArgumentParser()
    add_ppa_arguments(parser, defaults={"p": 0.75})          # --p --window --sink-tokens --backend ...
    args = parser.parse_args()
    ppa_hf.apply(model, **ppa_settings(args))                 # validated: p, window, sink_tokens, ...

The choices of ``--backend`` and ``--granularity`` are the plugin's own (:data:`ppa_hf.hf.settings.BACKENDS`, its
aliases, :data:`~ppa_hf.hf.settings.GRANULARITIES`), so a new backend shows up in every command at once.
"""

from __future__ import annotations

from ..hf.settings import BACKEND_ALIASES, BACKENDS, DEFAULTS, GRANULARITIES, check_backend
from ..pattern import check_int, check_p

# the settings, in the order of ppa_hf.apply's arguments; each is the option --<name with dashes>
PPA_NAMES = ("p", "window", "sink_tokens", "backend", "granularity", "block_size")
_PLUGIN_DEFAULTS = {"window": DEFAULTS["ppa_window"], "sink_tokens": DEFAULTS["ppa_sink_tokens"],
                    "backend": DEFAULTS["ppa_backend"], "granularity": DEFAULTS["ppa_granularity"],
                    "block_size": DEFAULTS["ppa_block_size"]}
_HELP = {
    "p": "PPA power p in [0, 1] (a float or a fraction like 3/4; 1 = full attention)",
    "window": "PPA local window w (the query itself included)",
    "sink_tokens": "first tokens of each sequence that every query attends",
    "backend": "attention path",
    "granularity": "PPA pattern: token (the paper's) or block",
    "block_size": "block size of the block pattern",
}


def option_name(name: str) -> str:
    """``"sink_tokens"`` -> ``"--sink-tokens"``."""
    return "--" + name.replace("_", "-")


def add_ppa_arguments(parser, defaults: dict | None = None, omit=(), keep_saved: bool = False):
    """Add ``--p --window --sink-tokens --backend --granularity --block-size`` to an ``argparse`` parser.

    Args:
        parser: an ``ArgumentParser`` (or a parent parser / argument group).
        defaults: overrides of the plugin's defaults by setting name, e.g. ``{"p": 0.75, "window": 32}``.
            Without one, ``--p`` is required (the plugin has no default p) unless ``keep_saved``.
        omit: setting names not to add (a command with ``--ps`` omits ``"p"``); the rest keep their order.
        keep_saved: every option defaults to ``None``, read as "keep the value saved in the model's config,
            else the plugin's default" (commands that load a saved PPA model, e.g. ``ppa-hf eval``).

    Returns the parser. Read the values back with :func:`ppa_settings`.
    """
    defaults = dict(defaults or {})
    unknown = set(defaults) - set(PPA_NAMES) or set(omit) - set(PPA_NAMES)
    if unknown:
        raise ValueError(f"unknown PPA setting(s) {sorted(unknown)}; the settings are {', '.join(PPA_NAMES)}")
    kinds = {"p": {}, "window": {"type": int}, "sink_tokens": {"type": int}, "block_size": {"type": int},
             "backend": {"choices": BACKENDS + tuple(BACKEND_ALIASES)}, "granularity": {"choices": GRANULARITIES}}
    for name in PPA_NAMES:
        if name in omit:
            continue
        if keep_saved:
            default = defaults.get(name)
            shown = "the model's saved ppa_p" if name == "p" else f"saved, else {_PLUGIN_DEFAULTS[name]}"
        else:
            default = defaults.get(name, _PLUGIN_DEFAULTS.get(name))
            shown = default
        required = default is None and not keep_saved  # only --p has no plugin default
        help_text = _HELP[name] + ("" if required else f" (default: {shown})")
        if name == "backend":
            help_text += f"; {', '.join(f'{a} = {b}' for a, b in BACKEND_ALIASES.items())}"
        parser.add_argument(option_name(name), default=default, required=required, help=help_text, **kinds[name])
    return parser


def check_granularity(value, name: str = "--granularity") -> str:
    """``value`` if it is one of :data:`GRANULARITIES`, else ValueError naming ``name``."""
    if value not in GRANULARITIES:
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be one of "
                         f"{', '.join(map(repr, GRANULARITIES))}")
    return value


_CHECKS = {
    "p": lambda v, n: check_p(v, n),
    "window": lambda v, n: check_int(v, n, 1),
    "sink_tokens": lambda v, n: check_int(v, n, 0),
    "backend": lambda v, n: check_backend(v, n),
    "granularity": check_granularity,
    "block_size": lambda v, n: check_int(v, n, 1),
}


def check_ppa_values(values: dict) -> dict:
    """Validate PPA settings given by name (a subset of :data:`PPA_NAMES`); ``None`` stays ``None`` ("keep the
    saved value"). Errors are ``ValueError`` naming the option, the value and what is allowed (``--p=2 ...``).
    ``p`` comes back as a float (fractions like ``"3/4"`` read exactly), a backend alias as its name."""
    out = {}
    for name, value in values.items():
        if name not in _CHECKS:
            raise ValueError(f"unknown PPA setting {name!r}; the settings are {', '.join(PPA_NAMES)}")
        out[name] = None if value is None else _CHECKS[name](value, option_name(name))
    return out


def ppa_settings(args) -> dict:
    """The validated PPA settings found on ``args`` (an ``argparse.Namespace`` filled by a parser that
    :func:`add_ppa_arguments` extended), by name in :data:`PPA_NAMES` order: the keyword arguments of
    :func:`ppa_hf.apply` (``None`` for options left unset under ``keep_saved``)."""
    given = vars(args)
    return check_ppa_values({name: given[name] for name in PPA_NAMES if name in given})
