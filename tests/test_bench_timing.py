"""benchmarks.run's generate timing on CPU: the step clock sees every generated token, and the per-token figure is
the median of the steps after the first."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ppa_hf
from benchmarks import run as bench
from transformers_compat import CACHE


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
    spread: (max - min) / median of the runs' own medians, which are returned too, in the order the runs ran."""
    calls = []
    fake = {"a": [[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]], "b": [[10.0, 10.0, 10.0], [10.0, 11.0, 12.0]]}

    def fake_timing(model, batch, context, steps, static_, device="cuda", warm=True, reuse_cache=False):
        assert reuse_cache is static  # passed through (the test asks for it with static caches)
        impl = current[0]
        calls.append((impl, warm))
        return 100.0, 7.0, fake[impl][sum(c[0] == impl for c in calls) - 1]

    current = [None]
    monkeypatch.setattr(bench, "generate_timing", fake_timing)
    monkeypatch.setattr(bench, "use_impl", lambda model, impl, gran, p: current.__setitem__(0, impl))
    monkeypatch.setattr(bench.torch._dynamo, "reset", lambda: None)
    impls = [("a", "dense", 1.0), ("b", "token", 0.75)]
    out = bench.interleaved_generate(None, impls, 1, 64, 3, static, repeats=2, reuse_cache=static)
    expected = [("a", True), ("a", False), ("b", True), ("b", False)] if static else \
        [("a", True), ("b", True), ("a", False), ("b", False)]
    assert calls == expected
    assert out[impls[0]] == (100.0, 7.0, 4.0, (5.0 - 2.0) / 3.5, [2.0, 5.0])  # median of 1, 2, 3, 5, 5, 5
    assert out[impls[1]] == (100.0, 7.0, 10.0, (11.0 - 10.0) / 10.5, [10.0, 11.0])


def test_reused_static_cache_keeps_its_tensors_and_the_tokens():
    """The reused-cache mode of the generate timing: one StaticCache passed to successive generate calls, reset in
    place before each, keeps its tensors' addresses (what a recorded CUDA graph needs to replay) and gives the
    tokens of generate's own static cache and of the dynamic cache, with PPA, left padding included."""
    from transformers import StaticCache

    model = tiny_model()
    ids = torch.randint(3, bench.VOCAB, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dynamic = model.generate(ids, **kwargs)
        own = model.generate(ids, cache_implementation="static", **kwargs)
        cache = StaticCache(config=model.config, max_cache_len=48)
        outs, addresses = [], []
        for _ in range(2):
            cache.reset()
            outs.append(model.generate(ids, **{CACHE: cache}, **kwargs))
            addresses.append([(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers])
    assert torch.equal(own, dynamic) and all(torch.equal(o, dynamic) for o in outs)
    assert addresses[0] == addresses[1]


def test_generate_timing_with_a_reused_static_cache_on_cpu():
    model = tiny_model()
    prefill, first, later = bench.generate_timing(model, 2, 40, 4, static=True, device="cpu", reuse_cache=True)
    assert prefill > 0 and first > 0 and len(later) == 4


# The benchmark scripts below run in a subprocess under the Triton interpreter (Triton reads TRITON_INTERPRET when
# the kernels are defined), with benchmarks.run's GPU timer replaced by this wall-clock stand-in.
WALL_CLOCK_TIMER = """
import time
from benchmarks import run as bench
def kernel_ms(fn):
    t0 = time.perf_counter(); fn(); return ((time.perf_counter() - t0) * 1e3,) * 3
bench.kernel_ms = kernel_ms
"""


def run_interpreted(script: str, *args: str, **env: str):
    """``WALL_CLOCK_TIMER`` then ``script`` (with ``args`` in ``sys.argv[1:]`` and ``env`` added to the environment)
    in a subprocess under ``TRITON_INTERPRET=1`` from the repository root; asserts it succeeded and returns it."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root, **env}
    done = subprocess.run([sys.executable, "-c", WALL_CLOCK_TIMER + script, *args], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


TUNE_DECODE = """
import sys, types
bench.copy_bandwidth_gbs = lambda: 1000.0
args = types.SimpleNamespace(out=sys.argv[1], batches=[2], contexts=[300])
bench.part_tune_decode(args, bench.machine(), device="cpu")
"""


def test_tune_decode_on_cpu_under_the_interpreter(tmp_path):
    """benchmarks.run tune-decode end to end under the Triton interpreter (tiny cache, a wall-clock stand-in for
    do_bench): every launch configuration gives the default's output, and the rows name their configuration and
    split count."""
    pytest.importorskip("triton")
    import csv

    run_interpreted(TUNE_DECODE, str(tmp_path))
    with open(tmp_path / "tune_decode.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["impl"] == "ppa"]
    assert len(rows) == 2 * 11 and {r["granularity"] for r in rows} == {"token", "block"}
    assert all(float(r["max_diff"]) < 1e-2 and float(r["ms"]) > 0 for r in rows)
    splits = {r["config"]: int(r["splits"]) for r in rows if r["granularity"] == "token"}
    assert splits["1,64,4,3"] < splits["16,64,4,3"]  # more programs per multiprocessor: more splits


PACKED = """
import sys, types
bench.DTYPE = __import__("torch").float32
args = types.SimpleNamespace(out=sys.argv[1], head_dims=[16], lengths=[120], docs=[3])
bench.part_packed(args, bench.machine(), device="cpu")
"""


def test_packed_part_on_cpu_under_the_interpreter(tmp_path):
    """benchmarks.run packed end to end under the Triton interpreter (one packed row of 120 tokens, float32, a
    wall-clock stand-in for do_bench): the unpacked Triton kernels give rows for both granularities, and their
    layout holds the packed sequences."""
    pytest.importorskip("triton")
    import csv

    from benchmarks.run import packed_layout

    layout, spans = packed_layout(300, 3, "cpu")
    assert spans == [(0, 100), (100, 200), (200, 300)]
    assert layout.seg[0].tolist() == [0] * 100 + [1] * 100 + [2] * 100
    assert layout.pos[0].tolist() == list(range(100)) * 3
    done = run_interpreted(PACKED, str(tmp_path))
    print(done.stdout[-2000:])
    with open(tmp_path / "packed.csv") as handle:
        rows = list(csv.DictReader(handle))
    ours = [r for r in rows if r["impl"] == "triton_layout"]
    assert {r["granularity"] for r in ours} == {"token", "block"}
    assert all(float(r["max_diff"]) == 0.0 and float(r["fwdbwd_ms"]) > 0 and r["docs"] == "3" for r in ours)


PROFILE_PACKED = """
from benchmarks import profile_packed
profile_packed.main(["--device", "cpu", "--length", "64", "--head-dims", "16", "--docs", "4", "--profile"])
"""


def test_profile_packed_runs_on_cpu_under_the_interpreter():
    """benchmarks/profile_packed.py end to end under the Triton interpreter (one row of 64 tokens packed with 4
    sequences, head size 16, float32, a wall-clock stand-in for the GPU timer): a line of timings per granularity
    and the profiler table."""
    pytest.importorskip("triton")
    done = run_interpreted(PROFILE_PACKED)
    lines = [line for line in done.stdout.splitlines() if line.startswith("D=16 L=64 docs=4")]
    assert [line.split(":")[0].split()[-1] for line in lines] == ["token", "block"], done.stdout[-2000:]
    for line in lines:
        values = dict(item.split("=") for item in line.split(": ", 1)[1].split())
        assert set(values) == {"fwd_unpacked", "fwdbwd_unpacked", "fwd_rows", "fwdbwd_rows", "plan", "to_rows_q"}
        assert all(float(x) > 0 for x in values.values())
    assert "packed_prefill_backward" in done.stdout  # the profiler table of the unpacked path


TMA_LOADS = """
from benchmarks.experiments import tma_loads
tma_loads.main(["--device", "cpu", "--length", "80", "--head-dims", "16", "--heads", "4", "2"])
"""


def test_tma_loads_experiment_runs_on_cpu_under_the_interpreter(tmp_path):
    """benchmarks/experiments/tma_loads.py end to end under the Triton interpreter (80 tokens, 4 query / 2 KV heads of
    size 16, float32, a wall-clock stand-in for the GPU timer): a row per pattern and load kind, the descriptor loads
    equal to the pointer loads, and the JSON lines file."""
    pytest.importorskip("triton")
    import json

    run_interpreted(TMA_LOADS, OUT=str(tmp_path), PPA_TRITON_TMA="")  # ("": the default, as when unset)
    rows = [json.loads(line) for line in open(tmp_path / "tma_loads.jsonl")]
    assert [(r["pattern"], r["tma"]) for r in rows] == [(p, t) for p in ("dense", "block_0.75", "token_0.75")
                                                       for t in (0, 1)]
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["max_abs_diff_vs_pointer"] < 1e-5, r
