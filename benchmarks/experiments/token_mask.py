"""What the token pattern's per-element mask costs the Triton forward kernel: variants of
``token_mask_kernels._fwd_kernel`` on one shape (batch 1, 32 query / 8 KV heads, head size 64 and 128, bf16), token
p = 0.75 and 0.5, against SDPA flash and the dense (p = 1) Triton kernel; one JSON line per variant, and
``$OUT/kexp.jsonl``.

    python -m benchmarks.experiments.token_mask                        # CUDA: timings
    TRITON_INTERPRET=1 python -m benchmarks.experiments.token_mask     # CPU: variants 1 and 3 equal variant 0
"""
import os, sys, math, json
import torch
from benchmarks.experiments import token_mask_kernels as X
from ppa_hf.pattern import PPAPattern
from ppa_hf.ops.triton import prefill as P
from ppa_hf.ops.triton.common import LOG2E, triton

def half_words(wf):
    w = wf.view(torch.int64)
    lo = (w & 0xFFFFFFFF).to(torch.int64)
    lo = torch.where(lo >= 2**31, lo - 2**32, lo).to(torch.int32)
    hi = (w >> 32).to(torch.int32)
    return lo.contiguous(), hi.contiguous()

def fwd(variant, q, k, v, pattern, bm, bn, warps, stages):
    ctx = P._Ctx(pattern, q, k, 0, 0, None)
    B, H, L, D = q.shape
    lse_len = P._lse_len(q)
    o = torch.empty_like(q)
    lse = torch.full((B, H, max(lse_len, -(-L // bm) * bm)), float("inf"), device=q.device, dtype=torch.float32)
    fp, fi, pp, pi, pm = ctx.lists(bm, bn)
    wlo, whi = half_words(ctx.words[0])
    scale = 1 / math.sqrt(D)
    def run():
        X._fwd_kernel[(triton.cdiv(L, bm), B * H)](
            q, k, v, o, lse, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            ctx.H, ctx.G, L, L, 0, 0, lse.shape[-1],
            fp, fi, pp, pi, pm, *ctx.pattern_args(),
            HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, USE_WORDS=True,
            VARIANT=variant, WLO=wlo, WHI=whi, **ctx.flags)
        return o
    return run

if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    if dev == "cpu":  # correctness under the interpreter
        torch.manual_seed(0)
        for L, p in [(200, 0.75), (333, 0.5)]:
            q = torch.randn(1, 4, L, 64); k = torch.randn(1, 2, L, 64); v = torch.randn(1, 2, L, 64)
            pat = PPAPattern(p, 8)
            ref = fwd(0, q, k, v, pat, 16, 64, 4, 1)().clone()
            for var in (1, 3):
                out = fwd(var, q, k, v, pat, 16, 64, 4, 1)()
                print(L, p, var, float((out - ref).abs().max()))
        sys.exit()
    from triton.testing import do_bench
    out_dir = os.environ.get("OUT", ".")
    L = int(os.environ.get("KEXP_L", 32768))
    for D in (64, 128):
        cfg = P.configs(D, torch.bfloat16, dev)[0]
        q = torch.randn(1, 32, L, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, 8, L, D, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
        flash = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            t_flash = do_bench(flash, warmup=25, rep=100)
        dense = PPAPattern(1.0, 64)
        t_dense = do_bench(fwd(0, q, k, v, dense, *cfg), warmup=25, rep=100)
        for p in (0.75, 0.5):
            pat = PPAPattern(p, 64)
            ref = fwd(0, q, k, v, pat, *cfg)().clone()
            for var in (0, 1, 2, 3):
                run = fwd(var, q, k, v, pat, *cfg)
                err = float((run() - ref).abs().max())
                t = do_bench(run, warmup=25, rep=100)
                row = dict(head_dim=D, L=L, p=p, variant=var, fwd_ms=t, flash_ms=t_flash, dense_triton_ms=t_dense,
                           speedup_vs_flash=t_flash / t, max_err_vs_v0=err, cfg=str(cfg))
                print(json.dumps(row), flush=True)
                rows.append(row)
    with open(os.path.join(out_dir, "kexp.jsonl"), "w") as f:
        for r in rows: f.write(json.dumps(r) + "\n")
