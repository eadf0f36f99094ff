"""One runner for the speed figures of docs/benchmarks.md: every row in one process against stock attention.

    python -m benchmarks.run kernels  [--out benchmarks/results]   # attention alone vs SDPA flash: kernels.csv
    python -m benchmarks.run packed [--docs 4 32]                  # attention over packed rows: unpacked Triton
                                                                   # kernels vs FlexAttention: packed.csv
    python -m benchmarks.run train    [--out benchmarks/results]   # whole model, training step and prefill vs
                                                                   # attn_implementation="sdpa": model_train.csv
    python -m benchmarks.run generate [--out benchmarks/results]   # whole model, ms per new token vs "sdpa":
                                                                   # model_generate.csv
    python -m benchmarks.run tune     [--out benchmarks/results]   # Triton launch configurations: tune.csv
    python -m benchmarks.run tune-decode [--batches 1 8 32] [--contexts 32768 131072]   # the decode kernel's
                                                                   # launch configuration: tune_decode.csv

Each part appends its rows to its CSV as they are measured (a run cut short keeps what it measured) and rewrites
``results.md`` (markdown tables headed by GPU, versions, commit, date and command). Inputs are built outside the
timed region; kernel times are ``triton.testing.do_bench`` medians (20th-80th percentiles as the spread); a model
step is timed with CUDA events over repeated runs (median, min, max). Random weights and tokens: speed does not
depend on them. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ppa_hf  # noqa: E402
from ppa_hf.pattern import PPAPattern  # noqa: E402

DTYPE = torch.bfloat16
SHAPES = {  # Llama-style decoder shapes, random weights (no download)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=64),
    "llama-8b-layers": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                            head_dim=128),
}
VOCAB = 32000
PPA_VARIANTS = [("token", 0.75), ("block", 0.75), ("block", 0.5)]


def machine() -> dict:
    """The stamp of every row: :func:`ppa_hf.recipes.stamp.machine_stamp` (GPU, versions, Python, commit, date) and
    the Triton version."""
    import triton

    from ppa_hf.recipes.stamp import machine_stamp

    return machine_stamp() | {"triton": triton.__version__}


# ----------------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------------
def kernel_ms(fn) -> tuple[float, float, float]:
    """``(median, p20, p80)`` ms of ``fn`` by ``triton.testing.do_bench``; calls over 40 ms by 5 CUDA-event runs."""
    from triton.testing import do_bench

    fn()
    once = event_ms(fn, 1)[0]
    if once > 40:
        return event_ms(fn, 5)
    med, lo, hi = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return float(med), float(lo), float(hi)


def event_ms(fn, reps: int) -> tuple[float, float, float]:
    """``(median, min, max)`` ms over ``reps`` runs, each between two CUDA events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], times[0], times[-1]


def copy_bandwidth_gbs() -> float:
    """Device copy bandwidth in GB/s, bytes read plus bytes written (a 4 GiB device-to-device copy)."""
    src = torch.empty(2**31, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = kernel_ms(lambda: dst.copy_(src))[0]
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**32 / (ms / 1e3) / 1e9


# ----------------------------------------------------------------------------------------------------------------------
# CSV / markdown
# ----------------------------------------------------------------------------------------------------------------------
def append_rows(path: str, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path`` (the header is the union of the old and new columns)."""
    old = []
    if os.path.exists(path):
        with open(path) as handle:
            old = list(csv.DictReader(handle))
    allrows = old + rows
    fields = list(dict.fromkeys(k for r in allrows for k in r))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(allrows)


def markdown(path: str, title: str, rows: list[dict], cols: list[str], info: dict) -> None:
    def cell(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")
        return str(v)

    with open(path, "a") as handle:
        handle.write(f"\n## {title}\n\nGPU: {info['gpu']}; torch {info['torch']}; transformers {info['transformers']}; "
                     f"triton {info['triton']}; Python {info['python']}; commit {info['commit']}; {info['date']}\n\n"
                     f"Command: `python -m benchmarks.run {' '.join(sys.argv[1:])}`\n\n")
        handle.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in rows:
            handle.write("| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |\n")


class Out:
    """Rows of one part: appended to ``<out>/<name>.csv`` as they come, printed, and tabled in results.md."""

    def __init__(self, out_dir: str, name: str, info: dict):
        self.path = os.path.join(out_dir, f"{name}.csv")
        self.out_dir, self.info, self.rows = out_dir, info, []

    def add(self, row: dict) -> dict:
        row = {k: self.info[k] for k in ("gpu", "torch", "transformers", "commit", "date")} | row
        self.rows.append(row)
        append_rows(self.path, [row])
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                       if k not in ("gpu", "torch", "transformers", "commit", "date")), flush=True)
        return row


# ----------------------------------------------------------------------------------------------------------------------
# Kernels: attention alone
# ----------------------------------------------------------------------------------------------------------------------
def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sdpa_cudnn(q, k, v):
    """cuDNN's attention: what SDPA picks by default for these inputs on an H100/H200 with torch 2.11."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sdpa_backends(impl: str):
    """The SDPA backends a whole-model baseline may use: ``sdpa`` is SDPA as Transformers runs it (torch picks; on an
    H200 with torch 2.11 that is cuDNN's attention, which builds a new execution plan for every new key length);
    ``sdpa_flash`` excludes cuDNN (FlashAttention-2, memory-efficient or math, in torch's order)."""
    if impl != "sdpa_flash":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


SDPA_BASELINES = [("sdpa", "dense", 1.0), ("sdpa_flash", "dense", 1.0)]


def ppa_kernel(impl: str, pattern: PPAPattern, L: int):
    if impl == "triton":
        from ppa_hf.ops.triton import triton_ppa_attention

        return lambda q, k, v: triton_ppa_attention(q, k, v, pattern)
    from ppa_hf.ops.flex import _flex_fn, single_sequence_block_mask

    def flex(q, k, v):
        block_mask = single_sequence_block_mask(pattern, L, L, q.device)
        return _flex_fn(q.device)(q, k, v, block_mask=block_mask, enable_gqa=True)

    return flex


def time_attention(fn, q, k, v, do):
    def fwd():
        return fn(q, k, v)

    def fwdbwd():
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)

    fwdbwd()  # compile / build tile lists outside the timing
    return kernel_ms(fwd), kernel_ms(fwdbwd)


def part_kernels(args, info):
    out = Out(args.out, "kernels", info)
    variants = [("triton", "token", 0.75), ("triton", "block", 0.75), ("triton", "token", 0.5),
                ("triton", "token", 1.0), ("flex", "block", 0.75)]
    for D in args.head_dims:
        for L in args.lengths:
            long = L > 32768  # above 32k: the two p = 0.75 patterns only (each run takes seconds)
            torch.manual_seed(0)
            q, k, v = (torch.randn(1, h, L, D, device="cuda", dtype=DTYPE, requires_grad=True) for h in (32, 8, 8))
            do = torch.randn_like(q)
            (f, _, _), (fb, fb_lo, fb_hi) = time_attention(sdpa_flash, q, k, v, do)
            out.add(dict(head_dim=D, L=L, impl="sdpa_flash", granularity="dense", p=1.0, fwd_ms=f, fwdbwd_ms=fb,
                         fwdbwd_p20=fb_lo, fwdbwd_p80=fb_hi, speedup_fwd=1.0, speedup_fwdbwd=1.0))
            fc = fbc = float("nan")
            try:
                (fc, _, _), (fbc, lo_c, hi_c) = time_attention(sdpa_cudnn, q, k, v, do)
                out.add(dict(head_dim=D, L=L, impl="sdpa_cudnn", granularity="dense", p=1.0, fwd_ms=fc, fwdbwd_ms=fbc,
                             fwdbwd_p20=lo_c, fwdbwd_p80=hi_c, speedup_fwd=f / fc, speedup_fwdbwd=fb / fbc,
                             speedup_fwd_vs_cudnn=1.0, speedup_fwdbwd_vs_cudnn=1.0))
            except RuntimeError as err:  # no cuDNN attention for these inputs here
                print(f"sdpa_cudnn L={L} D={D}: {err}", flush=True)
            for impl, gran, p in variants:
                if long and (impl == "flex" or p != 0.75):
                    continue
                pattern = PPAPattern(p, 64, 0, gran, 128)
                try:
                    (f2, _, _), (fb2, lo2, hi2) = time_attention(ppa_kernel(impl, pattern, L), q, k, v, do)
                except Exception as err:  # record and go on
                    print(f"{impl} {pattern.name} L={L} D={D}: {type(err).__name__}: {err}", flush=True)
                    continue
                out.add(dict(head_dim=D, L=L, impl=impl, granularity=gran if p < 1 else "dense", p=p, fwd_ms=f2,
                             fwdbwd_ms=fb2, fwdbwd_p20=lo2, fwdbwd_p80=hi2, speedup_fwd=f / f2, speedup_fwdbwd=fb / fb2,
                             speedup_fwd_vs_cudnn=fc / f2, speedup_fwdbwd_vs_cudnn=fbc / fb2))
            del q, k, v, do
            torch.cuda.empty_cache()
    markdown(os.path.join(args.out, "results.md"), "Attention alone (ms; speedup vs SDPA flash and vs cuDNN, causal)",
             out.rows, ["head_dim", "L", "impl", "granularity", "p", "fwd_ms", "fwdbwd_ms", "speedup_fwd",
                        "speedup_fwdbwd", "speedup_fwd_vs_cudnn", "speedup_fwdbwd_vs_cudnn"], info)


def packed_layout(L: int, docs: int, device):
    """The layout of one row of ``L`` tokens packed with ``docs`` sequences (equal lengths, the last takes the
    rest), marked by restarting position ids as a data collator writes them; and the sequences' ``(start, end)``."""
    from ppa_hf.layout import PPALayout

    lengths = [L // docs] * (docs - 1) + [L - L // docs * (docs - 1)]
    pid = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    row = PPALayout(None, None, torch.arange(L, device=device), 0, L, one_sequence_per_row=True,
                    valid=torch.ones(1, L, dtype=torch.bool, device=device))
    ends = torch.tensor(lengths).cumsum(0).tolist()
    return row.linked_by_position_ids(pid), list(zip([0] + ends[:-1], ends))


def part_packed(args, info, device: str = "cuda"):
    """Attention over one packed row (``--docs`` sequences in ``L`` tokens), 32 query / 8 KV heads, bf16, forward
    and forward + backward, token and block p = 0.75: the Triton kernels on the sequences unpacked one per row
    (``triton_layout``: what eager ``auto`` runs above 4096 x 4096 pairs and a compiled step runs), and FlexAttention
    with the layout's BlockMask (what ``auto`` ran for block patterns at head size 128 before the descriptor loads).
    What the layers of one forward pass share is made once, untimed: the unpacked path's host-side plan (eager mode:
    in the first, untimed call) and Flex's mask (before it). Beside them, SDPA's flash kernel over each sequence on its own: the same sequences
    with full causal attention. ``max_diff``: the largest difference of the output from ``triton_layout``'s."""
    from ppa_hf.ops.flex import flex_attention_ppa, flex_available, layout_block_mask
    from ppa_hf.ops.triton import triton_layout_attention

    out = Out(args.out, "packed", info)
    for D in args.head_dims:
        for L in args.lengths:
            for docs in args.docs:
                layout, spans = packed_layout(L, docs, device)
                torch.manual_seed(0)
                q, k, v = (torch.randn(1, h, L, D, device=device, dtype=DTYPE, requires_grad=True) for h in (32, 8, 8))
                do = torch.randn_like(q)
                common = dict(head_dim=D, L=L, docs=docs)

                def per_sequence(q, k, v):
                    return torch.cat([sdpa_flash(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in spans], dim=2)

                base = float("nan")
                try:
                    (f, _, _), (base, _, _) = time_attention(per_sequence, q, k, v, do)
                    out.add(dict(**common, impl="sdpa_flash_per_sequence", granularity="dense", p=1.0, fwd_ms=f,
                                 fwdbwd_ms=base, speedup_fwdbwd=1.0, max_diff=float("nan")))
                except RuntimeError as err:  # no flash kernel for these inputs (e.g. on a CPU)
                    print(f"sdpa_flash per sequence L={L} D={D}: {str(err)[:200]}", flush=True)
                for gran in ("token", "block"):
                    pattern = PPAPattern(0.75, 64, 0, gran, 128)
                    with torch.no_grad():
                        ref = triton_layout_attention(q, k, v, layout, pattern).float()
                    impls = {"triton_layout": lambda q, k, v: triton_layout_attention(q, k, v, layout, pattern)}
                    if flex_available():
                        block_mask = layout_block_mask(layout, pattern)
                        impls["flex"] = lambda q, k, v: flex_attention_ppa(q, k, v, block_mask)
                    for impl, fn in impls.items():
                        try:
                            with torch.no_grad():
                                diff = (fn(q, k, v).float() - ref).abs().max().item()
                            (f2, _, _), (fb2, _, _) = time_attention(fn, q, k, v, do)
                        except Exception as err:  # record and go on (Flex has no backward on a CPU)
                            print(f"{impl} {pattern.name} L={L} docs={docs} D={D}: {type(err).__name__}: {err}",
                                  flush=True)
                            continue
                        out.add(dict(**common, impl=impl, granularity=gran, p=0.75, fwd_ms=f2, fwdbwd_ms=fb2,
                                     speedup_fwdbwd=base / fb2, max_diff=diff))
                del q, k, v, do
                if device == "cuda":
                    torch.cuda.empty_cache()
    markdown(os.path.join(args.out, "results.md"), "Attention over packed rows (ms; speedup vs SDPA flash per sequence)",
             out.rows, ["head_dim", "L", "docs", "impl", "granularity", "p", "fwd_ms", "fwdbwd_ms", "speedup_fwdbwd",
                        "max_diff"], info)


def part_tune(args, info):
    """Launch configurations of the Triton kernels, one direction at a time (the others at their defaults)."""
    from ppa_hf.ops.triton import triton_ppa_attention

    out = Out(args.out, "tune", info)
    # (BLOCK_M, BLOCK_N, warps, stages); the word masks need BLOCK_N <= 64 (forward, dQ) and BLOCK_M <= 64 (dK/dV)
    fwd_cfgs = ["128,64,8,3", "128,64,4,3", "128,64,8,4", "128,128,8,3", "64,64,4,3"]
    dq_cfgs = ["128,64,8,2", "128,64,8,3", "64,64,4,3", "128,64,4,3", "64,64,4,2", "64,32,4,3", "128,32,8,3"]
    dkdv_cfgs = ["64,128,8,2", "64,128,8,3", "64,64,4,3", "64,128,4,2", "64,64,4,2", "64,64,8,3", "32,128,4,3",
                 "32,64,4,3"]
    for D in args.head_dims:
        L = args.lengths[0]
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, h, L, D, device="cuda", dtype=DTYPE, requires_grad=True) for h in (32, 8, 8))
        do = torch.randn_like(q)
        for gran, p in [("token", 0.75), ("block", 0.75)]:
            pattern = PPAPattern(p, 64, 0, gran, 128)
            fn = ppa_kernel("triton", pattern, L)
            for env, cfgs, what in [("PPA_TRITON_FWD", fwd_cfgs, "fwd"), ("PPA_TRITON_DQ", dq_cfgs, "fwdbwd"),
                                    ("PPA_TRITON_DKDV", dkdv_cfgs, "fwdbwd")]:
                for cfg in cfgs:
                    os.environ[env] = cfg
                    try:
                        (f, _, _), (fb, _, _) = time_attention(fn, q, k, v, do)
                    except Exception as err:
                        print(f"{env}={cfg} {pattern.name} D={D}: {type(err).__name__}: {str(err)[:200]}", flush=True)
                        continue
                    finally:
                        os.environ.pop(env, None)
                    out.add(dict(head_dim=D, L=L, granularity=gran, p=p, knob=env, config=cfg,
                                 ms=f if what == "fwd" else fb, measured=what))
        del q, k, v, do
        torch.cuda.empty_cache()


def part_tune_decode(args, info, device: str = "cuda"):
    """The decode kernel's launch configuration (``ppa_hf.ops.triton.decode.decode_config``: programs per
    multiprocessor, BLOCK_N, num_warps, num_stages), one knob at a time around the one in effect: one decoding query per
    row (32 query / 8 KV heads, head size 64, bf16) against a cache of ``context`` keys, token and block p = 0.75,
    for each batch and context; beside it SDPA's flash kernel over the whole cache and the dense floor (reading the
    whole cache once at the measured copy bandwidth). ``read_gbs``: the bytes of the listed key and value rows over
    the kernel's time."""
    from ppa_hf.ops.triton import decode

    out = Out(args.out, "tune_decode", info)
    bandwidth = copy_bandwidth_gbs()
    for batch in args.batches:
        base = decode.decode_config(batch * 8)  # the configuration in effect for this batch, varied around
        configs = ([base] + [(n, *base[1:]) for n in (1, 2, 4, 8, 16) if n != base[0]]
                   + [(base[0], n, *base[2:]) for n in (32, 64, 128) if n != base[1]]
                   + [(*base[:2], n, base[3]) for n in (2, 4, 8) if n != base[2]]
                   + [(*base[:3], n) for n in (2, 3, 4) if n != base[3]])
        for context in args.contexts:
            torch.manual_seed(0)
            q = torch.randn(batch, 32, 1, 64, device=device, dtype=DTYPE)
            k, v = (torch.randn(batch, 8, context, 64, device=device, dtype=DTYPE) for _ in range(2))
            cache_bytes = 2 * k.numel() * k.element_size()
            common = dict(batch=batch, context=context, dense_floor_ms=cache_bytes / (bandwidth * 1e9) * 1e3,
                          copy_gbs=round(bandwidth))
            try:
                flash = kernel_ms(lambda: sdpa_flash_decode(q, k, v))[0]
                out.add(dict(**common, impl="sdpa_flash", granularity="dense", p=1.0, config="", splits=0, ms=flash,
                             read_gbs=cache_bytes / (flash / 1e3) / 1e9, max_diff=0.0))
            except RuntimeError as err:  # no flash kernel for these inputs: the PPA rows still run
                print(f"sdpa_flash B={batch} T={context}: {str(err)[:200]}", flush=True)
            for gran, p in PPA_VARIANTS[:2]:
                pattern = PPAPattern(p, 64, 0, gran, 128)
                index, count = pattern.key_lists(torch.tensor([context - 1], device=device), context)
                index, count = index[None].to(torch.int32), count[None].to(torch.int32)  # [1, 1, N], [1, 1]
                read = int(count.sum()) * batch * 8 * 2 * 64 * k.element_size()
                first = None
                for cfg in configs:
                    decode.set_decode_config(cfg)
                    try:
                        fn = lambda: decode.triton_decode_attention(q, k, v, index, count, check=False)  # noqa: E731
                        o = fn()
                        first = o if first is None else first
                        ms = kernel_ms(fn)[0]
                    finally:
                        decode.set_decode_config(None)
                    out.add(dict(**common, impl="ppa", granularity=gran, p=p, config=",".join(map(str, cfg)),
                                 splits=decode.decode_splits(batch * 8, index.shape[-1], q.device, cfg[0], cfg[1]),
                                 ms=ms, read_gbs=read / (ms / 1e3) / 1e9,
                                 max_diff=(o.float() - first.float()).abs().max().item()))
            del q, k, v
            if device == "cuda":
                torch.cuda.empty_cache()


def sdpa_flash_decode(q, k, v):
    """One decoding query per row over the whole cache, SDPA's flash kernel (GQA by ``enable_gqa``)."""
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


# ----------------------------------------------------------------------------------------------------------------------
# Whole model: training step and prefill
# ----------------------------------------------------------------------------------------------------------------------
def make_model(shape: str, layers: int, max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=max_len,
                      rope_theta=500000.0, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(DTYPE)
    return model


def use_impl(model, impl: str, gran: str | None, p: float | None, backend: str = "auto"):
    if impl.startswith("sdpa"):
        model.set_attn_implementation("sdpa")
    else:
        ppa_hf.apply(model, p=p, granularity=gran, block_size=128, backend=backend)


ATTENTION_KERNELS = ("flash", "fmha", "attention", "_fwd_kernel", "_bwd_dq", "_bwd_dkdv", "flex", "triton_tem")


def attention_share(step) -> float:
    """Fraction of the GPU kernel time of ``step`` spent in attention kernels (flash / efficient SDPA, the PPA
    Triton kernels, FlexAttention), from torch.profiler's device events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    total = attn = 0.0
    for evt in prof.events():
        if evt.device_type != DeviceType.CUDA:
            continue
        t = evt.time_range.elapsed_us()
        total += t
        if any(s in evt.name.lower() for s in ATTENTION_KERNELS):
            attn += t
    return attn / total if total else float("nan")


def train_layers(args, shape: str, L: int) -> int:
    """Decoder layers of a training benchmark: ``--layers`` up to 32k, ``--layers-long`` above; half of it for the
    8B-layer shape (its layers are about four times the 1B shape's)."""
    layers = args.layers_long if L > 32768 else args.layers
    return max(1, layers // 2) if shape == "llama-8b-layers" else layers


def part_train(args, info):
    out = Out(args.out, "model_train", info)
    for shape in args.shapes if not args.compiled_only else []:
        for L in args.lengths:
            layers = train_layers(args, shape, L)
            model = make_model(shape, layers, L)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
            ids = torch.randint(0, VOCAB, (1, L), device="cuda")
            for mode in args.modes:
                base = base_flash = None
                for impl, gran, p in args.baselines + [("ppa", g, p) for g, p in PPA_VARIANTS]:
                    use_impl(model, impl, gran, p)
                    if mode == "train":
                        model.train()

                        def step():
                            model(ids, labels=ids, use_cache=False).loss.backward()
                            model.zero_grad(set_to_none=True)
                    else:
                        model.eval()

                        def step():
                            with torch.no_grad():
                                model(ids, use_cache=False, logits_to_keep=1)
                    try:
                        with sdpa_backends(impl):
                            step()
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                            med, lo, hi = event_ms(step, args.reps)
                            peak = torch.cuda.max_memory_allocated() / 2**30
                            share = attention_share(step) if impl.startswith("sdpa") else float("nan")
                    except torch.cuda.OutOfMemoryError:
                        print(f"OOM {shape} L={L} {impl} {gran} {p} {mode}", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    base = med if impl == "sdpa" else base
                    base_flash = med if impl == "sdpa_flash" else base_flash
                    out.add(dict(shape=shape, head_dim=SHAPES[shape]["head_dim"], layers=layers, L=L, mode=mode,
                                 compiled=0, impl=impl, granularity=gran, p=p, step_ms=med, step_ms_min=lo,
                                 step_ms_max=hi, speedup_vs_sdpa=base / med if base else float("nan"),
                                 speedup_vs_sdpa_flash=base_flash / med if base_flash else float("nan"),
                                 peak_gib=peak, attention_share=share))
            del model, ids
            torch.cuda.empty_cache()
    if args.compiled or args.compiled_only:
        part_train_compiled(args, out)
    markdown(os.path.join(args.out, "results.md"), "Whole model: training step (fwd+bwd, grad checkpointing) and "
             "prefill (forward, no grad), batch 1", out.rows,
             ["shape", "head_dim", "layers", "L", "mode", "compiled", "impl", "granularity", "p", "step_ms",
              "step_ms_min", "step_ms_max", "speedup_vs_sdpa", "speedup_vs_sdpa_flash", "peak_gib", "attention_share"],
             info)


def part_train_compiled(args, out):
    """The training step under torch.compile (what accelerate's --dynamo_backend inductor does), against compiled
    sdpa; one shape and length (compilation takes a while per variant)."""
    shape, L = args.shapes[0], args.lengths[0]
    layers = train_layers(args, shape, L)
    base = None
    for impl, gran, p in [("sdpa", "dense", 1.0)] + [("ppa", g, p) for g, p in PPA_VARIANTS[:2]]:
        model = make_model(shape, layers, L)
        use_impl(model, impl, gran, p)
        model.train()
        compiled = torch.compile(model)
        ids = torch.randint(0, VOCAB, (1, L), device="cuda")

        def step():
            compiled(ids, labels=ids, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)

        counters = torch._dynamo.utils.counters
        counters.clear()
        t0 = time.time()
        step()
        step()
        torch.cuda.synchronize()
        compile_s = time.time() - t0
        graphs = counters["stats"]["unique_graphs"]  # graphs Dynamo compiled for the step: 1 without a graph break
        torch.cuda.reset_peak_memory_stats()
        med, lo, hi = event_ms(step, args.reps)
        peak = torch.cuda.max_memory_allocated() / 2**30
        base = base if base is not None else med
        out.add(dict(shape=shape, head_dim=SHAPES[shape]["head_dim"], layers=layers, L=L, mode="train",
                     compiled=1, impl=impl, granularity=gran, p=p, step_ms=med, step_ms_min=lo, step_ms_max=hi,
                     speedup_vs_sdpa=base / med, peak_gib=peak, attention_share=float("nan"),
                     compile_s=round(compile_s, 1), dynamo_graphs=graphs))
        del model, compiled
        torch._dynamo.reset()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# Whole model: generation
# ----------------------------------------------------------------------------------------------------------------------
def decode_timing(model, batch: int, context: int, steps: int, static: bool, compiled: bool,
                  growing_mask: bool = False):
    """``(prefill_ms, first_step_ms, ms_per_token)``: one prefill of ``context`` tokens, one decoding step, then
    ``steps`` timed steps (greedy; one new token per sequence per step). With a static cache the padding mask
    covers the whole cache (zeros past the current position: one shape, one CUDA graph) unless ``growing_mask``
    (one column more per step, as ``generate`` passes it: a new input shape, hence a new CUDA graph, every step)."""
    from transformers import DynamicCache, StaticCache

    ids = torch.randint(3, VOCAB, (batch, context), device="cuda")
    mask = torch.ones(batch, context + steps + 2, dtype=torch.long, device="cuda")
    cache = (StaticCache(config=model.config, max_cache_len=context + steps + 2) if static
             else DynamicCache(config=model.config))
    forward = model.forward
    if compiled:
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(ids, attention_mask=mask[:, :context], past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits
        tok = logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        prefill_ms = (time.perf_counter() - t0) * 1e3
        times = []
        static_mask = static and not growing_mask
        if static_mask:  # one mask shape for every step (zeros past the current position): one CUDA graph
            mask[:, context:] = 0
        for i in range(steps + 1):
            pos = torch.tensor([context + i], device="cuda")
            if static_mask:
                mask[:, context + i] = 1
            step_mask = mask if static_mask else mask[:, :context + i + 1]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = forward(tok, attention_mask=step_mask, past_key_values=cache, use_cache=True,
                             cache_position=pos, position_ids=pos[None].expand(batch, 1)).logits
            tok = logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    first = times[0]
    rest = sorted(times[1 + steps // 4:]) if compiled else sorted(times[1:])  # compiled: past the graph captures
    return prefill_ms, first, rest[len(rest) // 2]


class StepClock:
    """A ``generate`` stopping criterion that stops nothing and records, synchronised, when each new token is ready
    (``generate`` calls its criteria once per step)."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def __call__(self, input_ids, scores, **kwargs):
        self.sync()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_timing(model, batch: int, context: int, steps: int, static: bool, device: str = "cuda",
                    warm: bool = True, reuse_cache: bool = False) -> tuple[float, float, list[float]]:
    """``(prefill_ms, first_step_ms, step_ms)`` measured inside ``model.generate`` as a user calls it (greedy,
    ``steps + 2`` new tokens forced with ``min_new_tokens``) by a stopping criterion that timestamps every step:
    ``prefill_ms`` from the call to the first token, ``first_step_ms`` the step after it, ``step_ms`` the later steps.
    Each step includes everything ``generate`` does per token; the prefill's run-to-run variation stays out of the
    per-token figures. ``static``: ``cache_implementation="static"``, which Transformers compiles itself; ``warm``: a
    first untimed call pays first-call set-up (static: the compilation). ``reuse_cache`` (with ``static``): one
    ``StaticCache`` made here and passed to every call as ``past_key_values`` (reset before each), instead of the
    new cache ``generate`` allocates per call; its tensors keep their addresses, which CUDA-graph trees check
    before replaying a recorded step."""
    from transformers import StaticCache, StoppingCriteriaList

    ids = torch.randint(3, VOCAB, (batch, context), device=device)
    mask = torch.ones_like(ids)
    extra = dict(cache_implementation="static") if static else {}
    cache = None
    if static and reuse_cache:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        cache = StaticCache(config=model.config, max_cache_len=context + steps + 2)
        # the argument's name: `cache` in newer Transformers (`past_key_values` deprecated there), 5.17 knows only that
        extra = {"cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values": cache}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def run(new: int) -> tuple[float, list[float]]:
        clock = StepClock(sync)
        if cache is not None:
            cache.reset()  # in place: the same tensors, zeroed
        sync()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]), **extra)
        return (clock.times[0] - t0) * 1e3, [(b - a) * 1e3 for a, b in zip(clock.times, clock.times[1:])]

    with torch.no_grad():
        if warm:
            run(steps + 2 if static else 2)
        prefill, gaps = run(steps + 2)
    return prefill, gaps[0], gaps[1:]


def interleaved_generate(model, impls, batch: int, context: int, steps: int, static: bool, repeats: int,
                         reuse_cache: bool = False) -> dict:
    """:func:`generate_timing` for each of ``impls`` (``(impl, granularity, p)``) ``repeats`` times, in rounds in which
    every implementation runs once in turn: the host's and the GPU's speed drift over seconds, and taking turns
    spreads the drift over all of them instead of favouring whichever ran in a fast period. (Static caches run
    their repeats back to back: Transformers compiles the step per implementation.) Returns ``{impl triple:
    (prefill_ms, first_step_ms, ms_per_token, spread, round_medians)}``: the first run's prefill and first step, the
    median of all runs' later steps, the spread of the runs' own medians, ``(max - min) / median``, and those medians
    in the order the runs ran."""
    order = ([(r, v) for v in impls for r in range(repeats)] if static
             else [(r, v) for r in range(repeats) for v in impls])
    firsts, steps_of, medians = {}, {v: [] for v in impls}, {v: [] for v in impls}
    for r, v in order:
        impl, gran, p = v
        use_impl(model, impl, gran, p)
        try:
            with sdpa_backends(impl):
                prefill, first, later = generate_timing(model, batch, context, steps, static, warm=v not in firsts,
                                                        reuse_cache=reuse_cache)
        finally:
            if static and r == repeats - 1:
                torch._dynamo.reset()
        firsts.setdefault(v, (prefill, first))
        steps_of[v] += later
        medians[v].append(statistics.median(later))
        torch.cuda.empty_cache()
    return {v: (*firsts[v], statistics.median(steps_of[v]),
                (max(medians[v]) - min(medians[v])) / statistics.median(medians[v]), medians[v]) for v in impls}


def part_generate(args, info):
    out = Out(args.out, "model_generate", info)
    bandwidth = copy_bandwidth_gbs()
    print(f"copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    for layers in args.gen_layers:
        model = make_model("llama-1b", layers, max(args.contexts) + 4096)
        model.eval()
        for impl, gran, p in args.baselines + [("ppa", g, p) for g, p in PPA_VARIANTS[:2]]:
            use_impl(model, impl, gran, p)  # one short eager run first: kernel compilation stays out of the timings
            with sdpa_backends(impl):
                decode_timing(model, 2, 2048, 2, False, False)
        for cache_kind, compiled in args.gen_modes:
            for batch in args.batches:
                for context in args.contexts:
                    kv_bytes = 2 * layers * batch * 8 * context * 64 * 2
                    floor = kv_bytes / (bandwidth * 1e9) * 1e3
                    impls = args.baselines + [("ppa", g, p) for g, p in PPA_VARIANTS[:2]]
                    if args.timing == "generate":
                        try:
                            timed = interleaved_generate(model, impls, batch, context, args.steps,
                                                         cache_kind == "static", args.repeats,
                                                         reuse_cache=args.reuse_static_cache)
                        except torch.cuda.OutOfMemoryError:
                            print(f"OOM layers={layers} B={batch} T={context}", flush=True)
                            torch.cuda.empty_cache()
                            continue
                    else:
                        timed = {}
                        for impl, gran, p in impls:
                            use_impl(model, impl, gran, p)
                            try:
                                with sdpa_backends(impl):
                                    timed[(impl, gran, p)] = (*decode_timing(model, batch, context, args.steps,
                                                                             cache_kind == "static", compiled,
                                                                             args.growing_mask), float("nan"), [])
                            except torch.cuda.OutOfMemoryError:
                                print(f"OOM layers={layers} B={batch} T={context} {impl}", flush=True)
                            finally:
                                torch._dynamo.reset()
                                torch.cuda.empty_cache()
                    base = timed.get(("sdpa", "dense", 1.0), (None,) * 5)[2]
                    base_flash = timed.get(("sdpa_flash", "dense", 1.0), (None,) * 5)[2]
                    for (impl, gran, p), (prefill, first, per, spread, rounds) in timed.items():
                        mask = "growing" if cache_kind == "dynamic" or args.growing_mask else "whole-cache"
                        # generate() compiles a static-cache step itself (Transformers' automatic compilation)
                        compiled_step = compiled or (args.timing == "generate" and cache_kind == "static")
                        kind = "static-reused" if cache_kind == "static" and args.reuse_static_cache else cache_kind
                        out.add(dict(timing=args.timing, layers=layers, batch=batch, context=context, cache=kind,
                                     compiled=int(compiled_step), mask=mask, impl=impl, granularity=gran, p=p,
                                     ms_per_token=per,
                                     speedup_vs_sdpa=base / per if base else float("nan"),
                                     speedup_vs_sdpa_flash=base_flash / per if base_flash else float("nan"),
                                     first_step_ms=first, prefill_ms=prefill,
                                     dense_floor_ms=floor, copy_gbs=round(bandwidth), repeats=args.repeats,
                                     spread=spread, round_ms=" ".join(f"{m:.3f}" for m in rounds)))
        del model
        torch.cuda.empty_cache()
    markdown(os.path.join(args.out, "results.md"), "Whole model: decoding, ms per new token (greedy, one token per "
             "sequence per step)", out.rows,
             ["timing", "layers", "batch", "context", "cache", "compiled", "mask", "impl", "granularity", "p",
              "ms_per_token",
              "speedup_vs_sdpa", "speedup_vs_sdpa_flash", "first_step_ms", "prefill_ms", "dense_floor_ms", "repeats",
              "spread", "round_ms"], info)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["kernels", "packed", "train", "generate", "tune", "tune-decode"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--docs", type=int, nargs="+", default=[4, 32], help="packed: sequences per row")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (kernels, train, tune)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--modes", nargs="+", default=["train", "prefill"], choices=["train", "prefill"])
    ap.add_argument("--layers", type=int, default=8, help="decoder layers up to 32k (the 8B-layer shape: half)")
    ap.add_argument("--layers-long", type=int, default=4, help="decoder layers above 32k")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compiled", action="store_true", help="train: also the torch.compile'd step")
    ap.add_argument("--compiled-only", action="store_true", help="train: only the torch.compile'd step")
    ap.add_argument("--baselines", nargs="+", default=["sdpa", "sdpa_flash"], choices=["sdpa", "sdpa_flash"],
                    help="whole-model SDPA baselines (sdpa: as Transformers runs it; sdpa_flash: cuDNN excluded)")
    ap.add_argument("--gen-layers", type=int, nargs="+", default=[8])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--gen-modes", nargs="+", default=["dynamic", "static-compiled"],
                    choices=["dynamic", "static", "static-compiled"])
    ap.add_argument("--steps", type=int, default=32, help="timed decoding steps")
    ap.add_argument("--timing", default="steps", choices=["steps", "generate"],
                    help="generate: ms per token inside model.generate, every step timestamped (static caches: "
                         "Transformers compiles the step itself); steps: direct model calls, one per token, each "
                         "synchronised")
    ap.add_argument("--repeats", type=int, default=1,
                    help="--timing generate: timed generate calls whose step times are pooled (median)")
    ap.add_argument("--reuse-static-cache", action="store_true",
                    help="--timing generate, static caches: one StaticCache per implementation and timing, passed to its "
                         "untimed and timed generate calls (reset before each) instead of the new one generate "
                         "allocates per call (CSV cache=static-reused)")
    ap.add_argument("--growing-mask", action="store_true",
                    help="static caches: a padding mask one column longer each step, as generate() passes it")
    args = ap.parse_args(argv)
    args.lengths = args.lengths or ({"kernels": [32768, 131072], "tune": [32768], "packed": [32768]}
                                    .get(args.part, [16384, 32768, 131072]))
    args.gen_modes = [(m.split("-")[0], m.endswith("compiled")) for m in args.gen_modes]
    args.baselines = [b for b in SDPA_BASELINES if b[0] in args.baselines]
    os.makedirs(args.out, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64
    info = machine()
    print(info, flush=True)
    {"kernels": part_kernels, "packed": part_packed, "train": part_train, "generate": part_generate,
     "tune": part_tune, "tune-decode": part_tune_decode}[args.part](args, info)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
