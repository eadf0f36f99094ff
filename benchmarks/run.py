"""One runner for every PPA speed benchmark (attention-level forward / backward / decode, model-level).

    python -m benchmarks.run --suite full --out bench_out          # everything (H200: about 8 minutes)
    python -m benchmarks.run --suite smoke --out bench_out         # a quick subset
    python -m benchmarks.run --parts attention,decode,model --lengths 16384,32768 --ps 0.75

Writes ``attention.csv``, ``decode.csv``, ``model.csv`` and ``results.md`` (a markdown table headed with the GPU,
torch, triton, transformers and the commit) under ``--out``. Times are medians of CUDA-event timings
(``triton.testing.do_bench``; decode also under CUDA-graph replay). TFLOP/s count attended (query, key) pairs
only: forward ``4 * pairs * D * H``, backward ``2.5x`` that, so a sparse method is not credited for work it skips.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.attention  # noqa: F401
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppa_hf.ops.flex import single_sequence_block_mask as pattern_block_mask  # noqa: E402
from ppa_hf.ops.tiles import tile_classes, tile_density  # noqa: E402
from ppa_hf.pattern import PPAPattern  # noqa: E402

B, H, HKV, D = 1, 32, 8, 128
DTYPE = torch.bfloat16


def meta() -> dict:
    import transformers
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "commit": os.environ.get("PPA_COMMIT", commit),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def bench_ms(fn, rep=100, warmup=25) -> float:
    """Median ms: ``triton.testing.do_bench`` for short calls; for calls over 50 ms, 1 warm-up and 3 timed runs
    with CUDA events (do_bench would spend 5 calls estimating first)."""
    from triton.testing import do_bench

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    if start.elapsed_time(end) < 50:
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    times = []
    for _ in range(3):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(sorted(times)[1])


def attended_pairs(pattern: PPAPattern, L: int) -> int:
    """Exact number of attended (query, key) pairs of one sequence of length L (on the GPU, chunked)."""
    if pattern.is_full:
        return L * (L + 1) // 2
    dev = "cuda"
    k = torch.arange(L, device=dev)[None]
    tables = pattern.tables(L + 1, dev)
    total = 0
    step = max(1, (1 << 27) // L)
    for s in range(0, L, step):
        q = torch.arange(s, min(L, s + step), device=dev)[:, None]
        total += int(pattern.keep(q, k, tables=tables).sum())
    return total


# ----------------------------------------------------------------------------------------------------------------------
# Attention level
# ----------------------------------------------------------------------------------------------------------------------
def _flex():
    from ppa_hf.ops.flex import _flex_fn

    return _flex_fn(torch.device("cuda"))


def methods_for(L: int, ps, grans):
    """(name, p, granularity, pattern or None, callable factory)."""
    from ppa_hf.ops.triton import triton_ppa_attention

    out = []

    def sdpa(q, k, v):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def flex_with(pattern):
        def f(q, k, v):
            bm = pattern_block_mask(pattern, L, L, q.device)
            return _flex()(q, k, v, block_mask=bm, enable_gqa=True)
        return f

    def tri_with(pattern):
        return lambda q, k, v: triton_ppa_attention(q, k, v, pattern)

    out.append(("sdpa_dense_causal", 1.0, "dense", PPAPattern(1.0), sdpa))
    out.append(("flex_dense_causal", 1.0, "dense", PPAPattern(1.0), flex_with(PPAPattern(1.0))))
    out.append(("triton_dense_causal", 1.0, "dense", PPAPattern(1.0), tri_with(PPAPattern(1.0))))
    sw = PPAPattern(0.0, 64)
    out.append(("flex_sliding_window64", 0.0, "window", sw, flex_with(sw)))
    out.append(("triton_sliding_window64", 0.0, "window", sw, tri_with(sw)))
    for p in ps:
        for gran in grans:
            pat = PPAPattern(p, 64, 0, gran, 128)
            out.append((f"flex_{gran}", p, gran, pat, flex_with(pat)))
            out.append((f"triton_{gran}", p, gran, pat, tri_with(pat)))
    return out


def attention_bench(lengths, ps, grans, rows, log, skip=(), long_from=32768, long_ps=(1.0, 0.0, 0.75),
                    long_skip=("flex_token", "flex_dense_causal", "flex_sliding_window64")):
    """Every method at every length up to ``long_from``; above it, only ``long_ps`` and not ``long_skip``."""
    torch.manual_seed(0)
    for L in lengths:
        q = torch.randn(B, H, L, D, device="cuda", dtype=DTYPE, requires_grad=True)
        k = torch.randn(B, HKV, L, D, device="cuda", dtype=DTYPE, requires_grad=True)
        v = torch.randn(B, HKV, L, D, device="cuda", dtype=DTYPE, requires_grad=True)
        do = torch.randn(B, H, L, D, device="cuda", dtype=DTYPE)
        rep = 100 if L <= 32768 else 60
        base = {}
        for name, p, gran, pat, fn in methods_for(L, ps, grans):
            if any(s in f"{name}@{p}@{L}" for s in skip):
                continue
            if L > long_from and (p not in long_ps or name in long_skip):
                continue
            pairs = attended_pairs(pat, L)
            try:
                t0 = time.time()
                fn(q, k, v)  # compile / build masks outside the timing
                torch.autograd.grad(fn(q, k, v), (q, k, v), do)
                torch.cuda.synchronize()
                setup_s = time.time() - t0
                fwd = bench_ms(lambda: fn(q, k, v), rep=rep)
                fb = bench_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do), rep=rep)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                torch.autograd.grad(fn(q, k, v), (q, k, v), do)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**30
                err = ""
            except Exception as exc:  # record, keep going
                fwd = fb = peak = float("nan")
                setup_s = 0.0
                err = f"{type(exc).__name__}: {str(exc)[:120]}"
            bwd = fb - fwd
            flops_fwd = 4.0 * pairs * D * H * B
            if name == "sdpa_dense_causal":
                base = {"fwd": fwd, "bwd": bwd, "fb": fb}
            tiles = tile_density(tile_classes(pat, L, L, 128, 128)) if pat is not None else {}
            row = dict(L=L, method=name, p=p, granularity=gran, fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=fb,
                       fwd_tflops=flops_fwd / fwd / 1e9, bwd_tflops=2.5 * flops_fwd / bwd / 1e9 if bwd > 0 else float("nan"),
                       speedup_fwd=base.get("fwd", float("nan")) / fwd, speedup_bwd=base.get("bwd", float("nan")) / bwd,
                       speedup_fwd_bwd=base.get("fb", float("nan")) / fb, peak_gib=peak, pairs=pairs,
                       pair_fraction=pairs / (L * (L + 1) / 2), tiles_128_kept=(tiles.get("partial", 0) + tiles.get("full", 0)),
                       tiles_128_full=tiles.get("full", 0), setup_s=setup_s, error=err)
            rows.append(row)
            log(f"L={L:>6} {name:<24} p={p:<5} fwd {fwd:8.3f} ms  bwd {bwd:8.3f} ms  fwd+bwd {fb:8.3f} ms  "
                f"x{row['speedup_fwd']:.2f}/x{row['speedup_bwd']:.2f}/x{row['speedup_fwd_bwd']:.2f}  "
                f"{row['fwd_tflops']:.0f}/{row['bwd_tflops']:.0f} TF/s  peak {peak:.2f} GiB {err}")
        del q, k, v, do
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------------------------------
def decode_index_for(pattern, T, nq=1):
    keep = pattern.keep(torch.arange(T - nq, T, device="cuda")[:, None], torch.arange(T, device="cuda")[None],
                        length=T + 1)
    count = keep.sum(-1, dtype=torch.int32)
    n = int(count.max())
    slot = torch.where(keep, keep.cumsum(-1) - 1, n)
    index = torch.zeros(nq, n + 1, dtype=torch.int32, device="cuda")
    index.scatter_(-1, slot, torch.arange(T, dtype=torch.int32, device="cuda").expand(nq, T).contiguous())
    return index[None, :, :n].contiguous(), count[None], n


def decode_bench(caches, batches, ps, grans, rows, log):
    from triton.testing import do_bench_cudagraph

    from ppa_hf.ops.triton import triton_decode_attention

    torch.manual_seed(0)
    for T in caches:
        for Bt in batches:
            q = torch.randn(Bt, H, 1, D, device="cuda", dtype=DTYPE)
            k = torch.randn(Bt, HKV, T, D, device="cuda", dtype=DTYPE)
            v = torch.randn(Bt, HKV, T, D, device="cuda", dtype=DTYPE)

            def dense():
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            t_dense = bench_ms(dense) * 1e3
            t_dense_g = do_bench_cudagraph(dense, rep=100, return_mode="median") * 1e3
            dense_bytes = Bt * HKV * T * D * 2 * 2
            rows.append(dict(T=T, batch=Bt, method="sdpa_dense", p=1.0, granularity="dense", keys=T, us=t_dense,
                             us_graph=t_dense_g, tbps=dense_bytes / t_dense_g / 1e6, speedup=1.0, speedup_graph=1.0,
                             index_us=0.0))
            log(f"decode T={T} B={Bt} sdpa_dense {t_dense:.1f} us (graph {t_dense_g:.1f} us) "
                f"{dense_bytes / t_dense_g / 1e6:.2f} TB/s")
            for p in ps:
                for gran in grans:
                    pat = PPAPattern(p, 64, 0, gran, 128)
                    if gran == "block" and p != 0.75:
                        continue
                    index, count = [x[None] for x in pat.key_lists(torch.tensor([T - 1], device="cuda"), T)]
                    n = int(count.max())

                    def ppa():
                        return triton_decode_attention(q, k, v, index, count)

                    ref = F.scaled_dot_product_attention(
                        q.float(), k.float(), v.float(), enable_gqa=True,
                        attn_mask=pat.keep(torch.tensor([[T - 1]], device="cuda"),
                                           torch.arange(T, device="cuda")[None], length=T + 1))
                    err = (ppa().float() - ref).abs().max().item()
                    t = bench_ms(ppa) * 1e3
                    tg = do_bench_cudagraph(ppa, rep=100, return_mode="median") * 1e3
                    t_idx = bench_ms(lambda: [x[None] for x in pat.key_lists(torch.tensor([T - 1], device="cuda"), T)], rep=30) * 1e3
                    # the spec's baseline: index_select the attended rows, then SDPA
                    idx_long = index[0, 0].long()

                    def gather_sdpa():
                        return F.scaled_dot_product_attention(q, k.index_select(2, idx_long),
                                                              v.index_select(2, idx_long), enable_gqa=True)

                    t_g = bench_ms(gather_sdpa) * 1e3
                    nbytes = Bt * HKV * n * D * 2 * 2
                    rows.append(dict(T=T, batch=Bt, method=f"triton_decode_{gran}", p=p, granularity=gran, keys=n,
                                     us=t, us_graph=tg, tbps=nbytes / tg / 1e6, speedup=t_dense / t,
                                     speedup_graph=t_dense_g / tg, index_us=t_idx, max_err_vs_fp32=err))
                    rows.append(dict(T=T, batch=Bt, method=f"index_select_sdpa_{gran}", p=p, granularity=gran, keys=n,
                                     us=t_g, us_graph=float("nan"), tbps=float("nan"), speedup=t_dense / t_g,
                                     speedup_graph=float("nan"), index_us=0.0))
                    log(f"decode T={T} B={Bt} p={p} {gran}: keys {n}  triton {t:.1f} us (graph {tg:.1f} us, "
                        f"{nbytes / tg / 1e6:.2f} TB/s) x{t_dense / t:.1f} (graph x{t_dense_g / tg:.1f}); "
                        f"index_select+sdpa {t_g:.1f} us; index build {t_idx:.1f} us/step; err {err:.2e}")
            del q, k, v
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# Model level (Llama-shaped, random weights)
# ----------------------------------------------------------------------------------------------------------------------
def model_bench(lengths, layers, gen_batches, new_tokens, rows, log, p=0.75):
    from transformers import LlamaConfig, LlamaForCausalLM

    import ppa_hf

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=140000,
                      rope_theta=500000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", DTYPE)
    variants = [("sdpa", None), ("ppa_token", "token"), ("ppa_block", "block")]

    def use(variant):
        name, gran = variant
        if gran is None:
            model.set_attn_implementation("sdpa")
        else:
            ppa_hf.apply(model, p=p, granularity=gran, backend="auto")

    for L in lengths:
        ids = torch.randint(0, 32000, (1, L), device="cuda")
        base = None
        for variant in variants:
            use(variant)
            model.train()

            def step():
                out = model(ids, labels=ids, use_cache=False)
                out.loss.backward()
                model.zero_grad(set_to_none=True)

            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = bench_ms(step, rep=300, warmup=50)
            peak = torch.cuda.max_memory_allocated() / 2**30
            base = base or t
            rows.append(dict(kind="train_step_fwd_bwd", L=L, batch=1, variant=variant[0], ms=t, tokens_per_s=L / t * 1e3,
                             speedup=base / t, peak_gib=peak))
            log(f"model train L={L} {variant[0]:<10} {t:9.1f} ms  x{base / t:.2f}  peak {peak:.1f} GiB")
        model.eval()
        for Bt in gen_batches:
            ids_b = torch.randint(0, 32000, (Bt, L), device="cuda")
            base = None
            for variant in variants:
                use(variant)
                with torch.no_grad():
                    def gen(n):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        model.generate(ids_b, attention_mask=torch.ones_like(ids_b), max_new_tokens=n,
                                       min_new_tokens=n, do_sample=False, pad_token_id=0)
                        torch.cuda.synchronize()
                        return time.perf_counter() - t0

                    gen(2)
                    t1 = gen(1)
                    tn = gen(new_tokens + 1)
                decode_tps = Bt * new_tokens / (tn - t1)
                base = base or decode_tps
                rows.append(dict(kind="generate", L=L, batch=Bt, variant=variant[0], ms=tn * 1e3,
                                 tokens_per_s=decode_tps, speedup=decode_tps / base, peak_gib=float("nan"),
                                 prefill_ms=t1 * 1e3, new_tokens=new_tokens))
                log(f"model generate L={L} B={Bt} {variant[0]:<10} decode {decode_tps:8.1f} tok/s x{decode_tps / base:.2f}"
                    f"  (prefill+1 token {t1 * 1e3:.0f} ms, +{new_tokens} tokens {(tn - t1) * 1e3:.0f} ms)")
            del ids_b
            torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
def write_csv(path, rows):
    if not rows:
        return
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def md_table(rows, cols, fmt=None):
    fmt = fmt or {}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            val = r.get(c, "")
            if isinstance(val, float):
                val = (fmt.get(c, "{:.3g}")).format(val) if not math.isnan(val) else "-"
            cells.append(str(val))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="full", choices=["full", "smoke"])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--parts", default="attention,decode,model")
    ap.add_argument("--lengths", default=None)
    ap.add_argument("--ps", default=None)
    ap.add_argument("--grans", default="token,block")
    ap.add_argument("--skip", default="", help="comma list of substrings of 'method@p@L' to skip")
    ap.add_argument("--model-layers", type=int, default=8)
    ap.add_argument("--model-lengths", default="16384,32768")
    ap.add_argument("--gen-batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--caches", default="32768,131072")
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 512
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 512
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 4096
    smoke = args.suite == "smoke"
    lengths = [int(x) for x in (args.lengths or ("16384,32768" if smoke else "4096,16384,32768,65536,131072")).split(",")]
    ps = [float(x) for x in (args.ps or ("0.75" if smoke else "0.5,0.75,0.875")).split(",")]
    grans = args.grans.split(",")
    os.makedirs(args.out, exist_ok=True)
    info = meta()
    logf = open(os.path.join(args.out, "log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"# {info}")
    log(f"# command: {' '.join(sys.argv)}")
    parts = args.parts.split(",")
    att, dec, mod = [], [], []
    t0 = time.time()
    try:
        if "attention" in parts:
            attention_bench(lengths, ps, grans, att, log, skip=[s for s in args.skip.split(",") if s])
            write_csv(os.path.join(args.out, "attention.csv"), att)
            log(f"# attention done in {time.time() - t0:.0f} s")
        if "decode" in parts:
            decode_bench([int(x) for x in args.caches.split(",")], [1, 8], ps, grans, dec, log)
            write_csv(os.path.join(args.out, "decode.csv"), dec)
            log(f"# decode done in {time.time() - t0:.0f} s")
        if "model" in parts:
            model_bench([int(x) for x in args.model_lengths.split(",")], args.model_layers,
                        [int(x) for x in args.gen_batches.split(",")], args.new_tokens, mod, log)
            write_csv(os.path.join(args.out, "model.csv"), mod)
            log(f"# model done in {time.time() - t0:.0f} s")
    finally:
        write_csv(os.path.join(args.out, "attention.csv"), att)
        write_csv(os.path.join(args.out, "decode.csv"), dec)
        write_csv(os.path.join(args.out, "model.csv"), mod)
        head = (f"GPU: {info['gpu']}; torch {info['torch']}; triton {info['triton']}; transformers "
                f"{info['transformers']}; commit {info['commit']}; {info['date']}\n\n"
                f"Command: `python -m benchmarks.run {' '.join(sys.argv[1:])}`\n\n"
                f"Shape: batch {B}, {H} query heads, {HKV} KV heads, head dim {D}, bf16; window 64, block 128.\n\n")
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(head)
            if att:
                f.write("## Attention (ms; speedup vs dense causal SDPA flash; TFLOP/s on attended pairs)\n\n")
                f.write(md_table(att, ["L", "method", "p", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "speedup_fwd",
                                       "speedup_bwd", "speedup_fwd_bwd", "fwd_tflops", "bwd_tflops", "peak_gib",
                                       "pair_fraction", "error"]) + "\n\n")
            if dec:
                f.write("## Decode, one new token (us; graph = CUDA-graph replay)\n\n")
                f.write(md_table(dec, ["T", "batch", "method", "p", "keys", "us", "us_graph", "tbps", "speedup",
                                       "speedup_graph", "index_us"]) + "\n\n")
            if mod:
                f.write("## Model (Llama-shaped, random weights)\n\n")
                f.write(md_table(mod, ["kind", "L", "batch", "variant", "ms", "tokens_per_s", "speedup", "peak_gib",
                                       "prefill_ms"]) + "\n")
        log(f"# total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
