"""benchmarks.run's generate timing on CPU: the step clock sees every generated token, and the per-token figure is
the median of the steps after the first."""

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
    prefill, first, per = bench.generate_timing(model, 2, 40, 5, static=False, device="cpu")
    assert prefill == 7e3  # 16 - 9: the call's start to its first token
    assert first == 9e3  # 25 - 16: the step after the first token
    assert per == 15e3  # median of the later steps 11, 13, 15, 17, 19
