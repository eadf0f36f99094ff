"""PPA settings: where they live (the model config), their defaults, and their validation.

Everything is read from the config of the module that calls attention, so two models in one process keep
their own ``p``. Config fields (all saved by ``save_pretrained``):

=====================  ===========  =================================================================
field                  default      meaning
=====================  ===========  =================================================================
``ppa_p``              (required)   float in [0, 1], or a list with one value per layer (1 = full)
``ppa_window``         64           local window ``w`` (the query itself included), integer >= 1
``ppa_sink_tokens``    0            first ``s`` real tokens of each sequence always attended, >= 0
``ppa_backend``        ``"auto"``   ``auto`` | ``sdpa_mask`` | ``flex`` | ``decode`` | ``triton`` (see
                                    :func:`ppa_hf.hf.dispatch.choose_path`; ``naive`` is read as ``sdpa_mask``)
``ppa_granularity``    ``"token"``  ``token`` (the paper's pattern) | ``block`` (see docs)
``ppa_block_size``     128          block size of the block-granular pattern, integer >= 1
=====================  ===========  =================================================================
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ..pattern import PPAPattern, check_int, check_p

BACKENDS = ("auto", "sdpa_mask", "flex", "decode", "triton")
# Earlier releases called the dense-mask SDPA path "naive"; saved configs that say so keep working.
BACKEND_ALIASES = {"naive": "sdpa_mask"}
GRANULARITIES = ("token", "block")

DEFAULTS = {
    "ppa_window": 64,
    "ppa_sink_tokens": 0,
    "ppa_backend": "auto",
    "ppa_granularity": "token",
    "ppa_block_size": 128,
}
FIELDS = ("ppa_p",) + tuple(DEFAULTS)

MISSING_P_MESSAGE = (
    "ppa_p is not set: PPA needs the power p in [0, 1]. Pass it when loading, "
    "AutoModelForCausalLM.from_pretrained(path, attn_implementation='ppa', ppa_p=0.75), "
    "or patch a loaded model with ppa_hf.apply(model, p=0.75)."
)


@dataclass(frozen=True)
class PPASettings:
    """The validated PPA parameters of one attention layer; :attr:`pattern` is built once, here."""

    p: float
    window: int = 64
    sink_tokens: int = 0
    backend: str = "auto"
    granularity: str = "token"
    block_size: int = 128
    pattern: PPAPattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("p", check_p(self.p, "ppa_p"))
        set_("window", check_int(self.window, "ppa_window", 1))
        set_("sink_tokens", check_int(self.sink_tokens, "ppa_sink_tokens", 0))
        set_("block_size", check_int(self.block_size, "ppa_block_size", 1))
        set_("backend", check_backend(self.backend, "ppa_backend"))
        _check_choice(self.granularity, "ppa_granularity", GRANULARITIES)
        set_("pattern", PPAPattern(self.p, self.window, self.sink_tokens, self.granularity, self.block_size))


def check_backend(value, name: str = "ppa_backend") -> str:
    """``value`` as one of :data:`BACKENDS` (an alias of :data:`BACKEND_ALIASES` read as its name), or ValueError."""
    value = BACKEND_ALIASES.get(value, value) if isinstance(value, str) else value
    _check_choice(value, name, BACKENDS)
    return value


def _check_choice(value, name, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be one of {', '.join(map(repr, allowed))}")


def check_p_setting(value, num_layers: int | None, name: str = "ppa_p"):
    """Validate ``ppa_p``: one float, or one per layer (a list/tuple of length ``num_layers``)."""
    if value is None:
        raise ValueError(MISSING_P_MESSAGE)
    if isinstance(value, (list, tuple)):
        if num_layers is not None and len(value) != num_layers:
            raise ValueError(
                f"{name} has {len(value)} values but the model has {num_layers} layers; "
                f"{name} must be one float in [0, 1] or a list of {num_layers} floats in [0, 1]"
            )
        return [check_p(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return check_p(value, name)


def _num_layers(config) -> int | None:
    return getattr(config, "num_hidden_layers", None)


def read_settings(config, layer_idx: int | None) -> PPASettings:
    """The settings of layer ``layer_idx`` from ``config`` (raises ``ValueError`` when missing or invalid).

    Every attention call reads them, so the validated result is memoised on the raw field values (a config
    changed later gives new values, hence a new entry; errors are never memoised)."""
    own = vars(config)  # the fields are plain instance attributes; a dict lookup is much cheaper than getattr
    raw = tuple(own.get(name) for name in FIELDS)
    p = raw[0]
    per_layer = isinstance(p, (list, tuple))
    key = (tuple(p) if per_layer else p, *raw[1:], _num_layers(config) if per_layer else None,
           layer_idx if per_layer else None)
    if torch.compiler.is_compiling():  # traced once; the memo is for eager calls
        return _validated_settings.__wrapped__(key)
    try:
        return _validated_settings(key)
    except TypeError:  # an unhashable value (e.g. an array for p): validate without the memo
        return _validated_settings.__wrapped__(key)


@functools.lru_cache(maxsize=4096)
def _validated_settings(key: tuple) -> PPASettings:
    raw_p, *raw_rest, num_layers, layer_idx = key
    p = check_p_setting(list(raw_p) if isinstance(raw_p, tuple) else raw_p, num_layers)
    if isinstance(p, list):
        if layer_idx is None:
            raise ValueError("ppa_p is a per-layer list but the attention module has no layer_idx")
        p = p[layer_idx]
    values = {k: (DEFAULTS[k] if v is None else v) for k, v in zip(DEFAULTS, raw_rest)}
    return PPASettings(
        p=p,
        window=values["ppa_window"],
        sink_tokens=values["ppa_sink_tokens"],
        backend=values["ppa_backend"],
        granularity=values["ppa_granularity"],
        block_size=values["ppa_block_size"],
    )


def layer_patterns(config) -> set[PPAPattern]:
    """The distinct patterns of the model's layers (one unless ``ppa_p`` is a per-layer list)."""
    p = vars(config).get("ppa_p")
    layers = range(_num_layers(config)) if isinstance(p, (list, tuple)) else [None]
    return {read_settings(config, i).pattern for i in layers}


def write_settings(config, p, window=64, sink_tokens=0, backend="auto", granularity="token", block_size=128):
    """Validate and store every PPA field on ``config`` (so ``save_pretrained`` writes them all)."""
    values = {  # validate everything before touching the config
        "ppa_p": check_p_setting(p, _num_layers(config), "p"),
        "ppa_window": check_int(window, "window", 1),
        "ppa_sink_tokens": check_int(sink_tokens, "sink_tokens", 0),
        "ppa_backend": check_backend(backend, "backend"),
        "ppa_granularity": granularity,
        "ppa_block_size": check_int(block_size, "block_size", 1),
    }
    _check_choice(granularity, "granularity", GRANULARITIES)
    for name, value in values.items():
        setattr(config, name, value)


def fill_defaults(config) -> None:
    """Write defaults for the PPA fields a config lacks (``ppa_p`` has none), so saving records them."""
    own = vars(config)
    for name, default in DEFAULTS.items():
        if own.get(name) is None:
            setattr(config, name, default)
