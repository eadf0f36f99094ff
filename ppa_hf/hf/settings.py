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

After :func:`ppa_hf.hf.register.register`, each field is a :class:`ConfigSetting` on ``PreTrainedConfig``: a value is
validated when it is set (a bad value given to ``from_pretrained`` or read from config.json fails the load, naming
the field), and a config that carries PPA settings but names no attention runs PPA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ..pattern import PPAPattern, check_int, check_p
from . import ATTN_IMPLEMENTATION

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
        set_("p", check_p(self.p, "ppa_p"))  # one layer's p: a single number
        for attribute in ("window", "sink_tokens", "backend", "granularity", "block_size"):
            set_(attribute, check_setting("ppa_" + attribute, getattr(self, attribute)))
        set_("pattern", PPAPattern(self.p, self.window, self.sink_tokens, self.granularity, self.block_size))


def check_setting(field_name: str, value, num_layers: int | None = None, label: str | None = None):
    """``value`` of the config field ``field_name`` validated and normalised, or ``ValueError`` naming ``label``
    (default: the field's name). The one validation of every PPA setting: config fields, ``apply``, PPASettings."""
    label = label or field_name
    if field_name == "ppa_p":
        return check_p_setting(value, num_layers, label)
    if field_name in ("ppa_window", "ppa_block_size"):
        return check_int(value, label, 1)
    if field_name == "ppa_sink_tokens":
        return check_int(value, label, 0)
    if field_name == "ppa_backend":
        return check_backend(value, label)
    if field_name == "ppa_granularity":
        _check_choice(value, label, GRANULARITIES)
        return value
    raise ValueError(f"{field_name!r} is not a PPA setting; the settings are {', '.join(FIELDS)}")


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
    """Validate and store every PPA field on ``config`` (so ``save_pretrained`` writes them all). Errors name
    the arguments of :func:`ppa_hf.apply` (``p``, ``window``, ...)."""
    given = {"p": p, "window": window, "sink_tokens": sink_tokens, "backend": backend, "granularity": granularity,
             "block_size": block_size}
    values = {"ppa_" + name: check_setting("ppa_" + name, value, _num_layers(config), name)
              for name, value in given.items()}  # validate everything before touching the config
    for name, value in values.items():
        setattr(config, name, value)


def fill_defaults(config) -> None:
    """Write defaults for the PPA fields a config lacks (``ppa_p`` has none), so saving records them."""
    own = vars(config)
    for name, default in DEFAULTS.items():
        if own.get(name) is None:
            setattr(config, name, default)


class ConfigSetting:
    """A PPA field declared on ``PreTrainedConfig`` (a data descriptor; :func:`ppa_hf.hf.register.register` installs
    one per name of :data:`FIELDS`).

    The value lives in the config's ``__dict__``, so ``save_pretrained`` writes it and :func:`read_settings` reads it
    with a dict lookup; ``None`` means "not set". Setting a value validates it at once: ``from_pretrained(...,
    ppa_p=1.5)`` and a config.json with a bad value fail while loading, not at the first forward pass. Transformers
    routes ``from_pretrained`` keyword arguments into the config only for names the config class has, which is why
    the names are declared on the class at all.
    """

    def __init__(self, field_name: str):
        self.field_name = field_name

    def __get__(self, config, owner=None):
        if config is None:
            return self
        return vars(config).get(self.field_name)

    def __set__(self, config, value):
        if value is not None:
            value = check_setting(self.field_name, value, _num_layers(config))
        vars(config)[self.field_name] = value
        if value is not None:
            follow_settings(config)


def follow_settings(config) -> None:
    """Called when a PPA value is set on ``config``: make the attention the settings describe the config's own.

    * No attention named yet (``from_pretrained(folder)`` of a folder saved with PPA settings, or a new config):
      the attention becomes ``"ppa"``, so a PPA model never silently reloads as sdpa.
    * The attention is ``"ppa"``: a config Transformers builds as an encoder-decoder or a bidirectional encoder is
      refused now, while loading (the model-level check, :func:`ppa_hf.hf.register.check_model`, runs in ``apply``
      and at the first forward pass).
    * A named attention (``str``) is written as ``attn_implementation`` beside the settings, so config.json records
      it: reloading gives the same attention, and Transformers without ``import ppa_hf`` refuses ``"ppa"`` with an
      error instead of running another attention.
    """
    attention = getattr(config, "_attn_implementation_internal", None)
    if attention is None:
        config._attn_implementation = attention = ATTN_IMPLEMENTATION
    if attention == ATTN_IMPLEMENTATION:
        check_causal_config(config)
    if isinstance(attention, str):
        vars(config)["attn_implementation"] = attention


def check_causal_config(config) -> None:
    """``ValueError`` for a config that Transformers builds as a model whose attention is not causal
    self-attention: an encoder-decoder, ``is_causal=False``, or a bidirectional-encoder family (BERT, RoBERTa, ...:
    those with a masked-LM head, causal only with ``is_decoder=True``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    name = type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} describes an encoder-decoder model; PPA supports decoder-only causal self-attention")
    if getattr(config, "is_causal", True) is False:
        raise ValueError(f"{name} is configured as non-causal (config.is_causal=False); PPA is causal")
    if getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder",
                                                                                                False):
        raise ValueError(
            f"{name} describes a bidirectional encoder (config.is_decoder=False), whose attention is non-causal; "
            "PPA supports causal self-attention only"
        )
