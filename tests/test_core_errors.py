"""Bad input gets a ValueError naming the parameter, the value and what is allowed; nothing falls back."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, T5Config
from transformers import T5ForConditionalGeneration

import ppa_hf
from ppa_hf.models import tiny_config


def tiny_llama():
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


@pytest.mark.parametrize("bad,pattern", [
    (2, r"p=2\.0 is outside the allowed range; p must be a real number in \[0, 1\]"),
    (-0.5, r"p=-0\.5 is outside"),
    (float("nan"), r"p=nan is outside"),
    ("abc", r"p='abc' is not a number"),
    (None, r"ppa_p is not set"),
    ([0.5, 0.5, 0.5], r"p has 3 values but the model has 2 layers"),
    ([0.5, 7.0], r"p\[1\]=7\.0 is outside"),
])
def test_apply_rejects_bad_p(bad, pattern):
    model = tiny_llama()
    with pytest.raises(ValueError, match=pattern):
        ppa_hf.apply(model, p=bad)
    assert model.config._attn_implementation != "ppa"  # nothing half-applied
    assert getattr(model.config, "ppa_p", None) is None


@pytest.mark.parametrize("kwargs,pattern", [
    ({"window": 0}, r"window=0 is outside the allowed range; window must be an integer >= 1"),
    ({"window": 2.5}, r"window=2\.5 is not an integer"),
    ({"window": "64"}, r"window='64' is not an integer"),
    ({"sink_tokens": -1}, r"sink_tokens=-1 is outside the allowed range; sink_tokens must be an integer >= 0"),
    ({"sink_tokens": 1.5}, r"sink_tokens=1\.5 is not an integer"),
    ({"backend": "fast"}, r"backend='fast' is not allowed; backend must be one of"),
    ({"granularity": "tile"}, r"granularity='tile' is not allowed"),
    ({"block_size": 0}, r"block_size=0 is outside"),
])
def test_apply_rejects_bad_settings(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ppa_hf.apply(tiny_llama(), p=0.5, **kwargs)


def test_loading_without_p_is_an_error_that_says_how(tmp_path):
    """No PPA value is set while loading, so no ppa_hf code runs: the first forward pass reports the missing p."""
    tiny_llama().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="ppa")
    with pytest.raises(ValueError, match=r"ppa_p is not set.*ppa_p=0\.75.*ppa_hf\.apply"):
        model(torch.randint(0, 100, (1, 10)))


def test_encoder_decoder_is_refused():
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    model = T5ForConditionalGeneration(config)
    with pytest.raises(ValueError, match="encoder-decoder"):
        ppa_hf.apply(model, p=0.5)


def test_non_causal_encoder_is_refused():
    model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64))
    with pytest.raises(ValueError, match="non-causal"):
        ppa_hf.apply(model, p=0.5)


def test_non_causal_encoder_forced_through_config_is_refused_at_run_time():
    """Settings first, under a named attention, then "ppa" through Transformers' own setter: no load-time check
    sees this config, the first forward pass refuses it."""
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, attn_implementation="eager")
    config.ppa_p = 0.5
    config._attn_implementation = "ppa"
    model = BertModel(config)
    with pytest.raises(ValueError, match="causal"):
        model(torch.randint(0, 64, (1, 12)))


def test_cross_attention_is_refused():
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, add_cross_attention=True)
    with pytest.raises(ValueError, match="cross-attention"):
        ppa_hf.apply(GPT2LMHeadModel(config), p=0.5)


def test_decoder_configured_bidirectional_is_refused_at_run_time():
    model = tiny_llama()
    ppa_hf.apply(model, p=0.5)
    model.config.is_causal = False
    with pytest.raises(ValueError, match="non-causal"):
        model(torch.randint(0, 100, (1, 12)))


def test_flex_backend_cannot_train_on_cpu():
    model = tiny_llama().train()
    ppa_hf.apply(model, p=0.5, backend="flex")
    x = torch.randint(0, 100, (1, 20))
    with pytest.raises(ValueError, match="no CPU backward.*ppa_backend='sdpa_mask'"):
        model(x, labels=x).loss.backward()


def test_prepared_4d_mask_is_refused():
    model = tiny_llama()
    ppa_hf.apply(model, p=0.5)
    mask = torch.ones(1, 1, 10, 10, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="prepared 4D mask"):
        model(torch.randint(0, 100, (1, 10)), attention_mask=mask)


def test_explicit_backend_refuses_dropout():
    config = tiny_config("llama", attention_dropout=0.5)
    model = AutoModelForCausalLM.from_config(config).train()
    ppa_hf.apply(model, p=0.5, backend="decode")
    with pytest.raises(ValueError, match="no attention dropout"):
        model(torch.randint(0, 100, (1, 20)))


def test_saved_naive_backend_reads_as_sdpa_mask():
    model = tiny_llama()
    model.config.ppa_p, model.config.ppa_backend = 0.5, "naive"  # what earlier releases saved
    assert ppa_hf.read_settings(model.config, 0).backend == "sdpa_mask"
    ppa_hf.apply(model, p=0.5, backend="naive")
    assert model.config.ppa_backend == "sdpa_mask"


def test_explicit_triton_backend_that_cannot_run_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU without the interpreter: no Triton kernels
    model = tiny_llama()
    ppa_hf.apply(model, p=0.5, backend="triton")
    with pytest.raises(ValueError, match="ppa_backend='triton' cannot serve this call"):
        model(torch.randint(0, 100, (1, 20)))


def test_gguf_quantizer_kept_when_weights_stay_packed():
    """forget_dequantized_gguf drops the GGUF quantizer only when every tensor is floating point; a model that
    kept packed (integer) GGUF blocks keeps it, so Transformers still refuses to save it."""
    import torch
    from transformers import AutoModelForCausalLM

    from ppa_hf.models import forget_dequantized_gguf, tiny_config

    class GgufHfQuantizer:  # stands in for transformers' class of that name
        pass

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.hf_quantizer = GgufHfQuantizer()
    model.register_buffer("packed_blocks", torch.zeros(4, dtype=torch.uint8))
    assert forget_dequantized_gguf(model) is False and isinstance(model.hf_quantizer, GgufHfQuantizer)
    del model.packed_blocks
    assert forget_dequantized_gguf(model) is True and model.hf_quantizer is None
    model.hf_quantizer = object()  # another quantizer: not ours to drop
    assert forget_dequantized_gguf(model) is False
