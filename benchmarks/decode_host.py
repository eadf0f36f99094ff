"""Host time of one decoding step's attention calls, sdpa (as Transformers runs it, and with cuDNN excluded) against
PPA (token and block, p = 0.75): the 1B-shaped model of benchmarks/run.py, 8 layers, dynamic cache, 32k context,
batch 1 and 8. The registered attention functions are wrapped with a ``time.perf_counter`` timer (host time of the
call, no synchronisation); each step is synchronised. One JSON line per (batch, implementation) with the step's
time, its host time, the first step after the prefill, and the attention call's host time in the first layer
(where PPA builds its index lists) and in the others (median over 29 steps), and the mask interface's host time
(once per step); plus, at batch 1, a cProfile table of ten whole steps for sdpa_flash and PPA (where a step's host
time goes, by function) and a torch.profiler table of PPA token steps. Needs a CUDA GPU.

    python benchmarks/decode_host.py    # $OUT/decode_host.jsonl, decode_step_profile_*.txt, decode_profile_token.txt
    python benchmarks/decode_host.py --parts host-parts sdpa-kernels   # the pieces of one call; sdpa's kernels
    python benchmarks/decode_host.py --parts cpu                       # the per-layer calls on a CPU
    python benchmarks/decode_host.py --parts cpu-short   # host time of a short-cache call on a CPU (dense-mask path)
    python benchmarks/decode_host.py --parts static-first-step   # where generate's first static-cache step goes
    python benchmarks/decode_host.py --parts eager-step-kernels  # an eager dynamic-cache step's GPU time, by kind
"""
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from benchmarks.run import SHAPES, VOCAB, make_model, sdpa_backends, use_impl  # noqa: E402
from ppa_hf.hf.dispatch import ppa_attention_forward  # noqa: E402

OUT = os.environ.get("OUT", ".")
HOST = collections.defaultdict(list)


def timed(name, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        r = fn(*a, **k)
        HOST[name].append(time.perf_counter() - t0)
        return r
    return wrapper


def install_timers(masks: bool = False):
    """Register timed versions of the ``sdpa`` and ``ppa`` attention functions (and, with ``masks``, of their mask
    interfaces, under ``mask_sdpa`` / ``mask_ppa``: once per forward pass); returns the function that puts the
    originals back."""
    from transformers import AttentionMaskInterface

    AttentionInterface.register("sdpa", timed("sdpa", sdpa_attention_forward))
    AttentionInterface.register("ppa", timed("ppa", ppa_attention_forward))
    originals = {name: AttentionMaskInterface._global_mapping[name] for name in ("sdpa", "ppa")} if masks else {}
    for name, fn in originals.items():
        AttentionMaskInterface.register(name, timed("mask_" + name, fn))

    def restore():
        AttentionInterface.register("sdpa", sdpa_attention_forward)
        AttentionInterface.register("ppa", ppa_attention_forward)
        for name, fn in originals.items():
            AttentionMaskInterface.register(name, fn)

    return restore


_STAMP = {}


def emit(**row):
    if not _STAMP:  # GPU, versions, Python, commit, date: the stamp of every row
        from ppa_hf.recipes.stamp import machine_stamp

        _STAMP.update(machine_stamp())
    row = {**_STAMP, **row}
    print(json.dumps(row), flush=True)
    with open(os.path.join(OUT, "decode_host.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def main():
    model = make_model("llama-1b", 8, 40000).eval()
    restore = install_timers(masks=True)
    for batch in (1, 8):
        ids = torch.randint(3, VOCAB, (batch, 32768), device="cuda")
        for impl, gran in (("sdpa", None), ("sdpa_flash", None), ("ppa", "token"), ("ppa", "block")):
            use_impl(model, impl, gran, 0.75)
            key = "ppa" if impl == "ppa" else "sdpa"
            with torch.no_grad(), sdpa_backends(impl):
                cache = DynamicCache(config=model.config)
                mask = torch.ones(batch, 32768 + 64, dtype=torch.long, device="cuda")
                tok = model(ids, attention_mask=mask[:, :32768], past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
                torch.cuda.synchronize()
                full, host, first, first_layer, other_layers, mask_calls = [], [], None, [], [], []
                for i in range(30):
                    HOST.clear()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = model(tok, attention_mask=mask[:, :32769 + i], past_key_values=cache)
                    t1 = time.perf_counter()
                    tok = out.logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    if i == 0:
                        first = (t2 - t0) * 1e3
                        continue
                    full.append((t2 - t0) * 1e3); host.append((t1 - t0) * 1e3)
                    calls = HOST[key]
                    first_layer.append(calls[0] * 1e6); other_layers.append(sum(calls[1:]) / (len(calls) - 1) * 1e6)
                    mask_calls.append(sum(HOST["mask_" + key]) * 1e6)
                full.sort(); host.sort()
                emit(part="decode", batch=batch, impl=impl, gran=gran, step_ms=full[len(full)//2],
                     host_ms=host[len(host)//2], first_ms=first,
                     attn_host_us_layer0=sorted(first_layer)[len(first_layer)//2],
                     attn_host_us_other_layers=sorted(other_layers)[len(other_layers)//2],
                     mask_host_us=sorted(mask_calls)[len(mask_calls)//2])
                if batch == 1 and impl in ("sdpa_flash", "ppa"):  # where a whole step's host time goes
                    import cProfile
                    import io
                    import pstats

                    profiler = cProfile.Profile()
                    profiler.enable()
                    for i in range(10):
                        out = model(tok, attention_mask=mask[:, :32769 + 30 + i], past_key_values=cache)
                        tok = out.logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    profiler.disable()
                    text = io.StringIO()
                    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
                    name = impl if gran is None else f"{impl}_{gran}"
                    with open(os.path.join(OUT, f"decode_step_profile_{name}.txt"), "w") as handle:
                        handle.write(text.getvalue())
                    cache.crop(32768 + 30)
                if batch == 1 and impl == "ppa" and gran == "token":
                    from torch.profiler import profile, ProfilerActivity
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for i in range(5):
                            out = model(tok, attention_mask=mask[:, :32769 + 30 + i], past_key_values=cache)
                            tok = out.logits[:, -1:].argmax(-1)
                        torch.cuda.synchronize()
                    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
                    print(table)
                    open(os.path.join(OUT, f"decode_profile_{gran}.txt"), "w").write(table)
            del cache
            torch.cuda.empty_cache()
    restore()
    del model
    torch.cuda.empty_cache()


# substrings of the attention kernels of a decoding step: SDPA's (flash, efficient, cuDNN) and PPA's decode kernels
DECODE_ATTENTION_KERNELS = ("attn", "fmha", "flash", "cudnn", "sdpa", "attention", "_decode", "_combine")


def attention_kernels(prof) -> dict:
    """``{kernel name (first 90 characters): count}`` of the attention kernels among a profile's device events."""
    names = collections.Counter()
    for e in prof.events():
        name = e.name
        if e.device_type.name == "CUDA" and any(k in name.lower() for k in DECODE_ATTENTION_KERNELS):
            names[name[:90]] += 1
    return dict(names)


def sdpa_kernels():
    """Which SDPA kernel stock sdpa runs, and its first-layer host time, in a decoding step called directly
    (``model(token, attention_mask=..., past_key_values=cache)``, as :func:`main`) and inside ``model.generate``:
    batch 1 and 8, 32k context, 3 steps each (the two timings of ``benchmarks.run generate`` disagree about sdpa)."""
    from torch.profiler import ProfilerActivity, profile

    model = make_model("llama-1b", 8, 40000).eval()
    restore = install_timers()
    use_impl(model, "sdpa", None, None)
    for batch in (1, 8):
        ids = torch.randint(3, VOCAB, (batch, 32768), device="cuda")
        mask = torch.ones(batch, 32768 + 64, dtype=torch.long, device="cuda")
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            tok = model(ids, attention_mask=mask[:, :32768], past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
            model(tok, attention_mask=mask[:, :32769], past_key_values=cache)
            torch.cuda.synchronize()
            HOST.clear()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for i in range(3):
                    model(tok, attention_mask=mask[:, :32770 + i], past_key_values=cache)
                torch.cuda.synchronize()
            emit(part="sdpa_kernels", how="direct", batch=batch, kernels=attention_kernels(prof),
                 first_layer_host_us=[round(HOST["sdpa"][j] * 1e6) for j in range(0, len(HOST["sdpa"]), 8)])
            del cache
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                           do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            HOST.clear()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                               do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
            emit(part="sdpa_kernels", how="generate", batch=batch, kernels=attention_kernels(prof),
                 first_layer_host_us=[round(HOST["sdpa"][j] * 1e6) for j in range(0, len(HOST["sdpa"]), 8)])
    restore()
    del model
    torch.cuda.empty_cache()


def host_parts(reps: int = 2000):
    """Host time of the pieces of one PPA decoding attention call (token p = 0.75, batch 1, 32 query / 8 KV heads,
    head size 64, 32k cached keys), each called ``reps`` times in a loop without synchronisation (the GPU work of
    each is a few microseconds, so the loop measures the host): the registered attention function, the path it
    runs, the decode op, each Triton launch alone, an allocation, sdpa's attention function, one torch addition;
    then a cProfile table of the attention call's loop (``$OUT/decode_host_call_profile.txt``)."""
    import timeit

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    from ppa_hf.hf.dispatch import run_path
    from ppa_hf.hf.mask import ppa_mask_interface
    from ppa_hf.hf.settings import read_settings, write_settings
    from ppa_hf.ops import decode_index
    from ppa_hf.ops.triton import decode as dec

    T = 32768
    config = LlamaConfig(**{**SHAPES["llama-1b"], "intermediate_size": 64}, num_hidden_layers=2, vocab_size=128)
    write_settings(config, 0.75)
    module = LlamaAttention(config, 1).cuda()
    layout = ppa_mask_interface(1, 1, T, q_offset=T - 1, attention_mask=torch.ones(1, T, dtype=torch.long,
                                device="cuda"), device="cuda", config=config)
    q = torch.randn(1, 32, 1, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, T, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    pos = torch.tensor([[T - 1]], device="cuda")
    settings = read_settings(config, 1)
    index, count = decode_index(layout, settings.pattern, None)
    calls = {}
    real_launch = dec.launch

    def recording(kernel, grid, args, constexprs, **options):
        calls[kernel.__name__ if hasattr(kernel, "__name__") else str(kernel)] = (kernel, grid, args, constexprs,
                                                                                    options)
        real_launch(kernel, grid, args, constexprs, **options)

    dec.launch = recording
    dec._decode(q, k, v, index, count, 0.125)
    dec.launch = real_launch
    pieces = {
        "attention call (ppa_attention_forward)": lambda: ppa_attention_forward(module, q, k, v, layout,
                                                                                scaling=0.125, position_ids=pos),
        "run_path (triton_decode)": lambda: run_path("triton_decode", q, k, v, layout, settings, 0.125, 0.0, None),
        "decode op (_decode: 2 launches)": lambda: dec._decode(q, k, v, index, count, 0.125),
        "output allocation": lambda: dec._decode_output(q),
        "sdpa attention call (flash)": None,
        "torch add": lambda: q + 1,
    }
    for name, (kernel, grid, args, constexprs, options) in calls.items():
        pieces[f"launch {name}"] = (lambda kernel=kernel, grid=grid, args=args, constexprs=constexprs,
                                    options=options: real_launch(kernel, grid, args, constexprs, **options))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_call():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa_attention_forward(module, q, k, v, None, scaling=0.125, is_causal=False)

    pieces["sdpa attention call (flash)"] = sdpa_call
    for rnd in (1, 2):  # two rounds, every piece in each: the first also warms the host (clocks, allocator)
        for name, fn in pieces.items():
            fn()
            torch.cuda.synchronize()
            us = timeit.timeit(fn, number=reps) / reps * 1e6
            torch.cuda.synchronize()
            emit(part="host_parts", round=rnd, piece=name, host_us=round(us, 2))
    # where the attention call's own Python time goes: cProfile of the same loop, by internal time
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    call = pieces["attention call (ppa_attention_forward)"]
    profiler.enable()
    for _ in range(reps):
        call()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    with open(os.path.join(OUT, "decode_host_call_profile.txt"), "w") as handle:
        handle.write(text.getvalue())
    print(text.getvalue()[:6000], flush=True)


def cpu_calls(contexts=(4096, 16384), steps: int = 20):
    """The same per-layer measurement on the CPU (no GPU needed): a 1B-shaped attention (32 query / 8 KV heads, head
    size 64) in 4 layers with a small MLP, bf16, batch 1, dynamic cache. On a CPU the call's time is its compute
    (PPA runs its torch gather path, sdpa its CPU kernel), so this compares work, not launch overhead."""
    import statistics

    from transformers import LlamaConfig, LlamaForCausalLM

    restore = install_timers()
    for context in contexts:
        for impl in ("sdpa", "ppa"):
            config = LlamaConfig(**{**SHAPES["llama-1b"], "intermediate_size": 256}, num_hidden_layers=4,
                                 vocab_size=256)
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
            use_impl(model, impl, "token", 0.75)
            ids = torch.randint(3, 200, (1, context))
            mask = torch.ones(1, context + steps + 1, dtype=torch.long)
            with torch.no_grad():
                cache = DynamicCache(config=model.config)
                tok = model(ids, attention_mask=mask[:, :context], past_key_values=cache,
                            logits_to_keep=1).logits.argmax(-1)
                HOST.clear()
                times = []
                for i in range(steps):
                    t0 = time.perf_counter()
                    tok = model(tok, attention_mask=mask[:, :context + 1 + i],
                                past_key_values=cache).logits[:, -1:].argmax(-1)
                    times.append(time.perf_counter() - t0)
            calls = HOST[impl][8:]  # past the first two steps
            emit(part="cpu", context=context, impl=impl, threads=torch.get_num_threads(),
                 step_ms=round(statistics.median(times[2:]) * 1e3, 2),
                 attn_us_per_layer=round(statistics.median(calls) * 1e6))
    restore()


def cpu_short_calls(context: int = 256, batch: int = 4, steps: int = 40, rounds: int = 3):
    """Host time of one decoding attention call on the CPU where its compute is negligible: the evaluation
    workload's attention (SmolLM2-135M: 9 query / 3 KV heads, head size 64), 8 layers with a small MLP, float32,
    ``batch`` left-padded rows, a dynamic cache of ``context`` keys (below 1024, so PPA runs its dense-mask SDPA
    path, as in the evaluation workload). sdpa, PPA at p = 1 and PPA token p = 0.75 take turns for ``rounds``
    rounds; per implementation the median over rounds and steps of the first layer's call (where PPA's per-forward
    work happens), of the other layers' calls, of the mask interface (once per forward pass: where sdpa builds its
    mask) and of a step's mask and attention host time together."""
    import statistics

    from transformers import LlamaConfig, LlamaForCausalLM

    restore = install_timers(masks=True)
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         intermediate_size=64, num_hidden_layers=8, vocab_size=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 200, (batch, context))
    mask = torch.ones(batch, context + steps + 1, dtype=torch.long)
    mask[1:, : context // 4] = 0  # left padding in all rows but the first
    impls = (("sdpa", None, None), ("ppa", "token", 1.0), ("ppa", "token", 0.75))
    first, other, mask_fn, step = ({v: [] for v in impls} for _ in range(4))
    for _ in range(rounds):
        for v in impls:
            impl, gran, p = v
            use_impl(model, impl, gran, p)
            with torch.no_grad():
                cache = DynamicCache(config=model.config)
                tok = model(ids, attention_mask=mask[:, :context], past_key_values=cache,
                            logits_to_keep=1).logits.argmax(-1)
                for i in range(steps):
                    HOST.clear()
                    tok = model(tok, attention_mask=mask[:, :context + 1 + i],
                                past_key_values=cache).logits[:, -1:].argmax(-1)
                    if i >= 2:
                        first[v].append(HOST[impl][0])
                        other[v].extend(HOST[impl][1:])
                        mask_fn[v].append(sum(HOST["mask_" + impl]))
                        step[v].append(sum(HOST[impl]) + sum(HOST["mask_" + impl]))
    for v in impls:
        emit(part="cpu_short", context=context, batch=batch, impl=v[0], gran=v[1], p=v[2],
             threads=torch.get_num_threads(), rounds=rounds,
             attn_us_layer0=round(statistics.median(first[v]) * 1e6, 1),
             attn_us_other_layers=round(statistics.median(other[v]) * 1e6, 1),
             mask_us=round(statistics.median(mask_fn[v]) * 1e6, 1),
             mask_and_attn_us_per_step=round(statistics.median(step[v]) * 1e6, 1))
    restore()


class _StepProfiles:
    """A ``generate`` stopping criterion (called once per new token) that runs cProfile over the first decoding step
    after the prefill and, separately, over the second, each synchronised at both ends, and times them."""

    def __init__(self):
        import cProfile

        self.calls, self.times = 0, []
        self.first, self.second = cProfile.Profile(), cProfile.Profile()

    def __call__(self, input_ids, scores, **kwargs):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if self.calls == 0:
            self.first.enable()
        elif self.calls == 1:
            self.first.disable()
            self.second.enable()
        elif self.calls == 2:
            self.second.disable()
        self.calls += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def static_first_step(batch=8, context=32768, new=8):
    """``generate(cache_implementation="static")`` (Transformers compiles the step, CUDA graphs), sdpa and PPA token
    p = 0.75: after one untimed call (compilation), a second call with cProfile over its first decoding step and over
    its second. Writes ``$OUT/static_first_step_<impl>.txt`` (the steps' times and the top functions by cumulative
    time) and prints the times."""
    import io
    import pstats

    from transformers import StoppingCriteriaList

    model = make_model("llama-1b", 8, context + 4096)
    model.eval()
    ids = torch.randint(3, VOCAB, (batch, context), device="cuda")
    for impl, gran in (("sdpa", None), ("ppa", "token")):
        use_impl(model, impl, gran, 0.75)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, cache_implementation="static")
            clock = _StepProfiles()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, cache_implementation="static",
                           stopping_criteria=StoppingCriteriaList([clock]))
        gaps = [round((b - a) * 1e3, 2) for a, b in zip(clock.times, clock.times[1:])]
        lines = [f"{impl} batch={batch} context={context}: step ms (first = after the prefill) {gaps}"]
        for name, prof in (("first step", clock.first), ("second step", clock.second)):
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(35)
            lines += [f"== {name}", text.getvalue()]
        print(lines[0], flush=True)
        with open(os.path.join(OUT, f"static_first_step_{impl}.txt"), "w") as handle:
            handle.write("\n".join(lines))
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel of a decoding step: ``cache_append`` (``torch.cat``, which the dynamic cache runs
    for every layer to append the step's keys and values to all earlier ones), ``attention``, ``matmul`` or
    ``other``."""
    low = name.lower()
    if "catarray" in low or low.startswith("cat") or "cat_" in low:
        return "cache_append"
    if any(s in low for s in DECODE_ATTENTION_KERNELS):
        return "attention"
    if any(s in low for s in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitk")):
        return "matmul"
    return "other"


def eager_step_kernels(batch=8, context=131072, layers=8, steps=5):
    """GPU time of an eager decoding step with Transformers' dynamic cache, by kind of kernel (torch.profiler over
    ``steps`` direct steps after a prefill and three warm steps), and the step's wall time (median of 10 synchronised
    steps), for sdpa, sdpa without cuDNN and PPA token and block p = 0.75. The dynamic cache appends each step's keys
    and values with ``torch.cat``, which reads and writes the whole cache of every layer: with ``bandwidth`` the
    measured copy bandwidth, ``2 * cache bytes / bandwidth`` is a cost every implementation pays per step, and
    ``step / (step - attention)`` of the fastest baseline bounds what any attention can win against it. One JSON
    line per implementation (``part=eager_step_kernels``), with the caching allocator's device allocations, frees
    and retries in the 10 timed steps and the host time per step in CUDA runtime calls other than kernel launches
    (``runtime_host_ms``: cudaMalloc, cudaFree, synchronisations, copies)."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.run import copy_bandwidth_gbs

    bandwidth = copy_bandwidth_gbs()
    cache_bytes = 2 * layers * batch * 8 * context * 64 * 2  # keys and values, bf16
    model = make_model("llama-1b", layers, context + 64).eval()
    ids = torch.randint(3, VOCAB, (batch, context), device="cuda")
    mask = torch.ones(batch, context + 64, dtype=torch.long, device="cuda")
    for impl, gran in (("sdpa", None), ("sdpa_flash", None), ("ppa", "token"), ("ppa", "block")):
        use_impl(model, impl, gran, 0.75)
        with torch.no_grad(), sdpa_backends(impl):
            cache = DynamicCache(config=model.config)
            tok = model(ids, attention_mask=mask[:, :context], past_key_values=cache,
                        logits_to_keep=1).logits.argmax(-1)
            n = context

            def step():
                nonlocal tok, n
                n += 1
                tok = model(tok, attention_mask=mask[:, :n], past_key_values=cache).logits[:, -1:].argmax(-1)

            for _ in range(3):
                step()
            times = []
            before = torch.cuda.memory_stats()
            for _ in range(10):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            after = torch.cuda.memory_stats()
            # the caching allocator in the timed steps: new device segments (cudaMalloc), released ones (cudaFree,
            # which synchronises the device) and retries after freeing the cache
            allocator = {k: after.get(k, 0) - before.get(k, 0)
                         for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    step()
                torch.cuda.synchronize()
            kinds, runtime = collections.Counter(), collections.Counter()
            for e in prof.key_averages():
                if e.device_type == torch.autograd.DeviceType.CUDA:  # kernels (not the host ops that launched them)
                    kinds[kernel_kind(e.key)] += e.self_device_time_total / 1e3 / steps
                elif e.key.startswith("cuda") and e.key != "cudaLaunchKernel":  # host time in the CUDA runtime
                    runtime[e.key] += e.self_cpu_time_total / 1e3 / steps
            emit(part="eager_step_kernels", batch=batch, context=context, layers=layers, impl=impl, gran=gran,
                 step_ms=round(sorted(times)[len(times) // 2], 3),
                 gpu_ms=round(sum(kinds.values()), 3), **{k + "_ms": round(v, 3) for k, v in sorted(kinds.items())},
                 **allocator, runtime_host_ms={k: round(v, 3) for k, v in runtime.most_common(6)},
                 copy_gbs=round(bandwidth), cache_gb=round(cache_bytes / 1e9, 2),
                 cache_append_floor_ms=round(2 * cache_bytes / (bandwidth * 1e9) * 1e3, 3))
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)
            name = impl if gran is None else f"{impl}_{gran}"
            with open(os.path.join(OUT, f"eager_step_kernels_{batch}_{context}_{name}.txt"), "w") as handle:
                handle.write(table)
        del cache
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["decode"],
                    choices=["decode", "sdpa-kernels", "host-parts", "cpu", "static-first-step",
                             "eager-step-kernels", "cpu-short"])
    ap.add_argument("--batch", type=int, default=8, help="eager-step-kernels: batch")
    ap.add_argument("--context", type=int, default=131072, help="eager-step-kernels: cached tokens")
    args = ap.parse_args()
    chosen = args.parts
    if "cpu-short" in chosen:
        cpu_short_calls()
    if "eager-step-kernels" in chosen:
        eager_step_kernels(args.batch, args.context)
    if "static-first-step" in chosen:
        static_first_step()
    if "cpu" in chosen:
        cpu_calls()
    if "host-parts" in chosen:
        host_parts()
    if "sdpa-kernels" in chosen:
        sdpa_kernels()
    if "decode" in chosen:
        main()
