"""Model-level behaviour on tiny random models of each family."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import ppa_hf
from ppa_hf.models import TINY_FAMILIES, tiny_config
from transformers_compat import CACHE


def tiny(family="llama", attn="sdpa", **overrides):
    torch.manual_seed(0)
    config = tiny_config(family, **overrides)
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config).eval()


def ids(batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, length), generator=g)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_p1_equals_stock_sdpa_with_left_padding(family):
    model = tiny(family)
    x = ids(2, 150)
    mask = torch.ones_like(x)
    mask[1, :41] = 0
    with torch.no_grad():
        ref = model(x, attention_mask=mask).logits
        ppa_hf.apply(model, p=1.0, window=8)
        out = model(x, attention_mask=mask).logits
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 41:], ref[1, 41:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_p_below_one_changes_long_range_only(family):
    model = tiny(family)
    x = ids(1, 120)
    with torch.no_grad():
        ref = model(x).logits
        ppa_hf.apply(model, p=0.5, window=16)
        out = model(x).logits
    # positions inside the window see every earlier token: identical; later positions differ
    torch.testing.assert_close(out[:, :16], ref[:, :16], atol=1e-5, rtol=1e-5)
    assert (out[:, 40:] - ref[:, 40:]).abs().max() > 1e-3


@pytest.mark.parametrize("window", [1, 5, 16])
def test_p0_equals_sliding_window_attention(window):
    # Mistral's own sliding window (sdpa) keeps keys with i - j < sliding_window: the same as PPA p = 0
    sliding = tiny("mistral", sliding_window=window)
    x = ids(2, 90)
    mask = torch.ones_like(x)
    mask[0, :13] = 0
    with torch.no_grad():
        ref = sliding(x, attention_mask=mask).logits
        plain = tiny("mistral")
        plain.load_state_dict(sliding.state_dict())
        ppa_hf.apply(plain, p=0.0, window=window)
        out = plain(x, attention_mask=mask).logits
    torch.testing.assert_close(out[0, 13:], ref[0, 13:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)


def test_model_sliding_window_is_intersected_not_dropped():
    sliding = tiny("mistral", sliding_window=12)
    x = ids(1, 80)
    with torch.no_grad():
        ref = sliding(x).logits
        ppa_hf.apply(sliding, p=1.0, window=4)  # PPA p=1 within the model's own window of 12 = window of 12
        out = sliding(x).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "sdpa_mask", "decode"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generate_with_cache_equals_without(family, backend):
    model = tiny(family)
    ppa_hf.apply(model, p=0.5, window=8, sink_tokens=2, backend=backend)
    x = ids(1, 20)
    kw = dict(max_new_tokens=40, do_sample=False, min_new_tokens=40, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(x, use_cache=True, **kw)
        uncached = model.generate(x, use_cache=False, **kw)
    assert cached.shape[1] == 60  # far past the window of 8
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("backend", ["sdpa_mask", "decode"])
def test_prefill_then_token_by_token_matches_full_forward_left_padded(backend):
    model = tiny("qwen2")
    ppa_hf.apply(model, p=0.75, window=6, sink_tokens=1, backend=backend)
    x = ids(2, 70)
    mask = torch.ones_like(x)
    mask[1, :9] = 0
    prefill = 30
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() makes them
    with torch.no_grad():
        full = model(x, attention_mask=mask, position_ids=positions).logits
        out = model(x[:, :prefill], attention_mask=mask[:, :prefill], position_ids=positions[:, :prefill],
                    use_cache=True)
        steps, cache = [out.logits], getattr(out, CACHE)
        for t in range(prefill, x.shape[1]):
            out = model(x[:, t : t + 1], attention_mask=mask[:, : t + 1], **{CACHE: cache}, use_cache=True,
                        position_ids=positions[:, t : t + 1])
            steps.append(out.logits)
            cache = getattr(out, CACHE)
    stepped = torch.cat(steps, dim=1)
    torch.testing.assert_close(stepped[0], full[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stepped[1, 9:], full[1, 9:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_left_padded_batch_generates_like_each_alone(family):
    model = tiny(family)
    ppa_hf.apply(model, p=0.625, window=5, sink_tokens=2)
    a, b = ids(1, 25, seed=2), ids(1, 11, seed=3)
    batch = torch.zeros(2, 25, dtype=torch.long)
    mask = torch.zeros(2, 25, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 14:], mask[1, 14:] = b[0], 1
    kw = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, **kw)
        alone_a = model.generate(a, **kw)
        alone_b = model.generate(b, **kw)
    assert torch.equal(together[0, 25:], alone_a[0, 25:])
    assert torch.equal(together[1, 25:], alone_b[0, 11:])


@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_sequences_equal_separate(use_cache):
    model = tiny("llama")
    ppa_hf.apply(model, p=0.5, window=4, sink_tokens=2)
    a, b, c = ids(1, 30, 4), ids(1, 17, 5), ids(1, 23, 6)
    packed = torch.cat([a, b, c], dim=1)
    position_ids = torch.cat([torch.arange(30), torch.arange(17), torch.arange(23)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=position_ids, use_cache=use_cache).logits
        parts = [model(t).logits for t in (a, b, c)]
    torch.testing.assert_close(out, torch.cat(parts, dim=1), atol=1e-5, rtol=1e-5)


def test_settings_survive_save_and_load(tmp_path):
    model = tiny("llama")
    model.save_pretrained(tmp_path / "base")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="ppa", ppa_p=0.75,
                                                  ppa_window=32, ppa_sink_tokens=4)
    x = ids(1, 100)
    with torch.no_grad():
        out1 = loaded(x).logits
    loaded.save_pretrained(tmp_path / "ppa")
    saved = json.loads((tmp_path / "ppa" / "config.json").read_text())
    assert saved["ppa_p"] == 0.75 and saved["ppa_window"] == 32 and saved["ppa_sink_tokens"] == 4
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ppa", attn_implementation="ppa")
    assert (again.config.ppa_p, again.config.ppa_window, again.config.ppa_sink_tokens) == (0.75, 32, 4)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, out1)


def test_apply_settings_saved(tmp_path):
    model = tiny("gpt2")
    ppa_hf.apply(model, p=0.5, window=32, sink_tokens=4)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["ppa_p"], saved["ppa_window"], saved["ppa_sink_tokens"]) == (0.5, 32, 4)


def test_two_models_two_p_in_one_process(tmp_path):
    tiny("llama").save_pretrained(tmp_path)
    x = ids(1, 120)
    m_half = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="ppa", ppa_p=0.5, ppa_window=8)
    m_full = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="ppa", ppa_p=1.0, ppa_window=8)
    sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    with torch.no_grad():
        half, full, ref = m_half(x).logits, m_full(x).logits, sdpa(x).logits
        torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
        assert (half - ref).abs().max() > 1e-3
        # interleaved calls keep their own p
        torch.testing.assert_close(m_half(x).logits, half)
    assert m_half.config.ppa_p == 0.5 and m_full.config.ppa_p == 1.0


def test_per_layer_p():
    model = tiny("llama")
    x = ids(1, 100)
    with torch.no_grad():
        ppa_hf.apply(model, p=0.5, window=8)
        uniform = model(x).logits
        ppa_hf.apply(model, p=[0.5, 0.5], window=8)
        torch.testing.assert_close(model(x).logits, uniform)
        ppa_hf.apply(model, p=[1.0, 0.0], window=8)
        mixed = model(x).logits
        ppa_hf.apply(model, p=[0.0, 1.0], window=8)
        swapped = model(x).logits
    assert (mixed - uniform).abs().max() > 1e-3 and (mixed - swapped).abs().max() > 1e-3


def test_training_step_has_gradients_on_cpu():
    model = tiny("llama").train()
    ppa_hf.apply(model, p=0.75, window=8, sink_tokens=1)
    x = ids(2, 64)
    loss = model(x, labels=x).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_static_cache_generation_matches_dynamic(family):
    # generate() with a static cache prepares the mask ahead of the forward pass: the layout passes through
    model = tiny(family)
    ppa_hf.apply(model, p=0.5, window=8, sink_tokens=2)
    x = ids(2, 20)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    kw = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0, attention_mask=mask)
    with torch.no_grad():
        dynamic = model.generate(x, **kw)
        static = model.generate(x, cache_implementation="static", **kw)
    assert torch.equal(dynamic, static)


def test_autocast_gives_the_kernels_one_dtype(monkeypatch):
    """Under autocast the rotary embedding leaves query/key in fp32 while value is bf16; PPA hands its kernels one
    dtype (the autocast one, as SDPA uses) and at p = 1 matches stock SDPA under the same autocast."""
    import ppa_hf.hf.dispatch as dispatch

    seen = []
    real = dispatch.sdpa_mask_attention

    def spy(query, key, value, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(dispatch, "sdpa_mask_attention", spy)
    x = ids(2, 40)
    stock = tiny("llama")
    model = tiny("llama", attn="ppa", ppa_p=1.0, ppa_backend="sdpa_mask")
    model.load_state_dict(stock.state_dict())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = stock(x).logits.float()
        got = model(x).logits.float()
    assert seen and set(seen) == {(torch.bfloat16,) * 3}, seen
    err = (got - want).abs().max().item()
    print(f"ppa p=1 vs sdpa under bf16 autocast: max |diff| {err:.3e}")
    assert err < 0.05 * want.abs().max().item()
