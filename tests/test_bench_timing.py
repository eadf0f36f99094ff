"""benchmarks.run's generate timing on CPU: the step clock sees every generated token, and the per-token figure is
the median of the steps after the first."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ppa_hf
from benchmarks import run as bench


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=bench.VOCAB)
    model = LlamaForCausalLM(config).eval()
    ppa_hf.apply(model, p=0.75, window=8)
    return model


def test_step_clock_records_one_time_per_new_token():
    model = tiny_model()
    clock = bench.StepClock(lambda: None)
    from transformers import StoppingCriteriaList

    ids = torch.randint(3, 100, (2, 40))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, min_new_tokens=7,
                             do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
    assert out.shape[1] - ids.shape[1] == 7 == len(clock.times)
    assert clock.times == sorted(clock.times)


def test_generate_timing_on_cpu(monkeypatch):
    """A fake clock whose k-th read is k**2 (growing gaps): the untimed first call reads 3 times (start, 2 tokens),
    the timed call reads its start (9) and one time per token (16, 25, ..., 100)."""
    model = tiny_model()
    reads = iter(range(1000))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(reads) ** 2))
    prefill, first, later = bench.generate_timing(model, 2, 40, 5, static=False, device="cpu")
    assert prefill == 7e3  # 16 - 9: the call's start to its first token
    assert first == 9e3  # 25 - 16: the step after the first token
    assert later == [11e3, 13e3, 15e3, 17e3, 19e3]  # the later steps


@pytest.mark.parametrize("static", [False, True])
def test_interleaved_generate_takes_turns_and_pools(monkeypatch, static):
    """Dynamic caches: rounds in which each implementation runs once in turn, only each one's first run warmed;
    static caches: each implementation's runs back to back. Per-token figure: the median of all runs' later steps;
    spread: (max - min) / median of the runs' own medians."""
    calls = []
    fake = {"a": [[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]], "b": [[10.0, 10.0, 10.0], [10.0, 11.0, 12.0]]}

    def fake_timing(model, batch, context, steps, static_, device="cuda", warm=True):
        impl = current[0]
        calls.append((impl, warm))
        return 100.0, 7.0, fake[impl][sum(c[0] == impl for c in calls) - 1]

    current = [None]
    monkeypatch.setattr(bench, "generate_timing", fake_timing)
    monkeypatch.setattr(bench, "use_impl", lambda model, impl, gran, p: current.__setitem__(0, impl))
    monkeypatch.setattr(bench.torch._dynamo, "reset", lambda: None)
    impls = [("a", "dense", 1.0), ("b", "token", 0.75)]
    out = bench.interleaved_generate(None, impls, 1, 64, 3, static, repeats=2)
    expected = [("a", True), ("a", False), ("b", True), ("b", False)] if static else \
        [("a", True), ("b", True), ("a", False), ("b", False)]
    assert calls == expected
    assert out[impls[0]] == (100.0, 7.0, 4.0, (5.0 - 2.0) / 3.5)  # median of 1, 2, 3, 5, 5, 5; medians 2 and 5
    assert out[impls[1]] == (100.0, 7.0, 10.0, (11.0 - 10.0) / 10.5)
