"""GPU correctness of every fast path against the reference (skips without CUDA).

Tolerance rule (FlashAttention's): the error of the fast path against an fp32 reference is at most 2x the error of the same
reference run in the fast path's dtype (bf16 / fp16); 3x for gradients. A float32 fast path is held to the same rule one
step up: against a float64 reference, at most 2x (3x) the error of the float32 reference (so tf32 rounding fails it).
Both errors are printed (run with ``-s``).
Awkward shapes throughout: odd lengths, GQA, q_len != kv_len, sinks, a model sliding window, block granularity.
"""

import pytest
import torch

from ppa_hf.ops.reference import reference_attention
from ppa_hf.pattern import PPAPattern
from transformers_compat import CACHE

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton/Flex fast paths)")
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover
    triton = None
needs_triton = pytest.mark.skipif(triton is None, reason="needs triton")

FWD_FACTOR, GRAD_FACTOR, FLOOR = 2.0, 3.0, 1e-6


def _keep(pattern, lq, lk, md=None, device="cuda"):
    q = torch.arange(lk - lq, lk, device=device)[:, None]
    k = torch.arange(lk, device=device)[None]
    return pattern.keep(q, k, length=lk + 1, max_distance=md)


def _check(name, fast_fn, pattern, B, H, Hkv, lq, lk, D, dtype, md=None, grads=True, keep=None):
    """``keep``: the reference's mask (default: one sequence per row, the queries the last ``lq`` of the keys)."""
    dev = "cuda"
    q = torch.randn(B, H, lq, D, device=dev, dtype=dtype)
    k = torch.randn(B, Hkv, lk, D, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, lk, D, device=dev, dtype=dtype)
    do = torch.randn(B, H, lq, D, device=dev, dtype=dtype)
    keep = _keep(pattern, lq, lk, md) if keep is None else keep

    def run(fn, dt):
        xs = [x.detach().to(dt).requires_grad_(grads) for x in (q, k, v)]
        out = fn(*xs)
        if not grads:
            return [out.double()]
        gs = torch.autograd.grad(out, xs, do.to(dt))
        return [out.double()] + [g.double() for g in gs]

    exact = torch.float64 if dtype == torch.float32 else torch.float32
    ref32 = run(lambda a, b, c: reference_attention(a, b, c, keep), exact)
    ref_lo = run(lambda a, b, c: reference_attention(a, b, c, keep), dtype)
    fast = run(fast_fn, dtype)
    labels = ["out", "dq", "dk", "dv"]
    for lab, f, r, rl in zip(labels, fast, ref32, ref_lo):
        e_fast = (f - r).abs().max().item()
        e_ref = (rl - r).abs().max().item()
        factor = FWD_FACTOR if lab == "out" else GRAD_FACTOR
        ok = e_fast <= factor * e_ref + FLOOR
        print(f"[{name}] {pattern.name} B={B} H={H} Hkv={Hkv} q={lq} kv={lk} D={D} {str(dtype)[6:]} md={md} "
              f"{lab}: fast={e_fast:.3e} ref_{str(dtype)[6:]}={e_ref:.3e} ratio={e_fast / max(e_ref, 1e-12):.2f} "
              f"{'PASS' if ok else 'FAIL'}")
        assert ok, f"{lab}: {e_fast} > {factor} x {e_ref}"


CASES = [  # pattern, B, H, Hkv, q_len, kv_len, D, dtype, max_distance
    (PPAPattern(0.75), 2, 8, 2, 1000, 1000, 128, torch.bfloat16, None),
    (PPAPattern(0.5, 16, 4), 1, 4, 4, 777, 777, 64, torch.float16, None),
    (PPAPattern(0.875), 1, 8, 1, 300, 1333, 128, torch.bfloat16, None),
    (PPAPattern(0.75, 64, 0, "block", 128), 1, 8, 2, 1500, 1500, 128, torch.bfloat16, None),
    (PPAPattern(0.5, 16, 2, "block", 64), 2, 4, 2, 1031, 1031, 64, torch.bfloat16, 300),
    (PPAPattern(1.0), 1, 4, 2, 513, 513, 128, torch.bfloat16, None),
    (PPAPattern(0.0, 64), 1, 4, 2, 999, 999, 128, torch.float16, None),
    (PPAPattern(0.75, 16, 1), 1, 4, 2, 517, 517, 64, torch.float32, None),  # float32: exact (IEEE) dots
    (PPAPattern(0.625, 16, 0, "block", 64), 1, 4, 1, 300, 701, 128, torch.float32, None),
]


@cuda
@needs_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].name}-q{c[4]}-kv{c[5]}")
def test_triton_prefill_matches_reference(case):
    from ppa_hf.ops.triton import triton_ppa_attention

    pattern, B, H, Hkv, lq, lk, D, dtype, md = case
    _check("triton", lambda a, b, c: triton_ppa_attention(a, b, c, pattern, max_distance=md), pattern, B, H, Hkv,
           lq, lk, D, dtype, md)


def packed_layouts(B: int, T: int, device="cuda"):
    """``{name: PPALayout}`` of ``B`` rows of ``T`` tokens that the block-sparse kernels cannot take as they are:
    packed sequences (restarting position ids), left padding, a padding hole, packed with the queries the last
    third (a cached prefix)."""
    from ppa_hf.layout import PPALayout

    def rows(valid, q_index=None):
        q_index = torch.arange(T, device=device) if q_index is None else q_index
        return PPALayout(None, None, q_index, 0, T, one_sequence_per_row=True, valid=valid)

    full = torch.ones(B, T, dtype=torch.bool, device=device)
    pid = torch.cat([torch.arange(n, device=device) for n in (T // 2 + 7, T // 3, T - T // 2 - 7 - T // 3)])
    packed = rows(full).linked_by_position_ids(pid[None].expand(B, -1))
    left, hole = full.clone(), full.clone()
    left[-1, :T // 5 + 3] = False
    hole[0, T // 3:T // 3 + 50] = False
    tail = PPALayout(packed.seg, packed.pos, torch.arange(T - T // 3, T, device=device), 0, T)
    return {"packed": packed, "left-padded": rows(left), "hole": rows(hole), "packed-tail": tail}


@cuda
@needs_triton
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[7]], ids=lambda c: f"{c[0].name}-D{c[6]}")
@pytest.mark.parametrize("layout_name", ["packed", "left-padded", "hole", "packed-tail"])
def test_triton_layout_attention_matches_reference(case, layout_name):
    """The block-sparse kernels on layouts they cannot take as they are (each sequence unpacked into a row of its
    own): forward and every gradient against the reference on the layout's mask."""
    from ppa_hf.ops.reference import layout_keep
    from ppa_hf.ops.triton import triton_layout_attention

    pattern, B, H, Hkv, _, lk, D, dtype, md = case
    layout = packed_layouts(B, lk)[layout_name]
    lq = layout.q_index.numel()
    _check(f"triton_layout {layout_name}",
           lambda a, b, c: triton_layout_attention(a, b, c, layout, pattern, max_distance=md), pattern, B, H, Hkv,
           lq, lk, D, dtype, md, keep=layout_keep(layout, pattern, md))


@cuda
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[4]], ids=lambda c: f"{c[0].name}-q{c[4]}")
def test_flex_analytic_blockmask_matches_reference(case):
    from ppa_hf.ops.flex import _flex_fn, single_sequence_block_mask

    pattern, B, H, Hkv, lq, lk, D, dtype, md = case

    def fn(a, b, c):
        bm = single_sequence_block_mask(pattern, lq, lk, a.device, max_distance=md)
        return _flex_fn(a.device)(a, b, c, block_mask=bm, enable_gqa=H != Hkv)

    _check("flex", fn, pattern, B, H, Hkv, lq, lk, D, dtype, md)


@cuda
@needs_triton
@pytest.mark.parametrize("pattern", [PPAPattern(0.75), PPAPattern(0.5, 32, 4), PPAPattern(0.75, 64, 0, "block", 128)],
                         ids=lambda p: p.name)
@pytest.mark.parametrize("nq", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B", [3, 32])  # 32 rows x 2 KV heads: the launch configuration for many programs
def test_triton_decode_matches_reference(pattern, nq, dtype, B):
    from ppa_hf.ops.triton import decode, triton_decode_attention

    H, Hkv, T, D = 8, 2, 5001, 128
    print(f"[decode] B={B} nq={nq}: launch configuration {decode.decode_config(B * Hkv * nq)}")
    keep = _keep(pattern, nq, T)
    count = keep.sum(-1)
    n = int(count.max())
    index = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[:, :n]
    _check("decode", lambda a, b, c: triton_decode_attention(a, b, c, index[None], count[None]), pattern, B, H, Hkv,
           nq, T, D, dtype, grads=False)


@cuda
@needs_triton
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_fused_decode_combine_is_deterministic_and_matches_the_combine_kernel(batch):
    """The fused combine (the last split of each program to finish combines the partials, through an atomic ticket)
    gives bitwise the same output in every one of 300 launches (a split that read another's partials before they
    were written would show up as a differing launch), matches the two-kernel path, and leaves the tickets at zero."""
    from ppa_hf.ops.triton import decode

    torch.manual_seed(0)
    T, H, Hkv, D = 32768, 32, 8, 64
    pattern = PPAPattern(0.75)
    q = torch.randn(batch, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    index, count = pattern.key_lists(torch.full((batch, 1), T - 1, device="cuda"), T)
    first = decode._decode(q, k, v, index, count, 0.125)
    outs = [decode._decode(q, k, v, index, count, 0.125) for _ in range(300)]
    differing = sum(not torch.equal(o, first) for o in outs)
    two_kernels = decode._decode(q, k, v, index, count, 0.125, fused=False)
    err = (first.float() - two_kernels.float()).abs().max().item()
    print(f"[fused combine] batch {batch}: {differing} of 300 launches differ; vs combine kernel {err:.2e}")
    assert differing == 0 and err < 0.02 * two_kernels.abs().max().item()
    *_, tickets = decode._BUFFERS.get(q.device, 1, 1, 64, 1)
    assert int(tickets.abs().sum()) == 0


@cuda
@needs_triton
@pytest.mark.parametrize("pattern", [PPAPattern(0.75), PPAPattern(0.5, 32, 4), PPAPattern(0.75, 64, 0, "block", 128),
                                     PPAPattern(0.625, 16, 3, "block", 64)], ids=lambda p: p.name)
def test_triton_decode_index_matches_torch_on_gpu(pattern):
    """The one-launch index list equals the torch list (within each query's count) on a long, padded layout: left
    padding, holes, one row with a single real token; one and four queries; a model window."""
    import itertools

    from ppa_hf.layout import PPALayout
    from ppa_hf.ops.gather import decode_index
    from ppa_hf.ops.triton import triton_decode_index

    T = 40001
    torch.manual_seed(0)
    valid = torch.ones(4, T, dtype=torch.bool, device="cuda")
    valid[1, :9000] = False
    valid[2, torch.rand(T, device="cuda") < 0.2] = False
    valid[3, :-1] = False
    for nq, md in itertools.product((1, 4), (None, 3000)):
        def make():
            return PPALayout(None, None, torch.arange(T - nq, T, device="cuda"), 0, T, one_sequence_per_row=True,
                             valid=valid)
        i0, c0 = decode_index(make(), pattern, md)
        i1, c1 = triton_decode_index(make(), pattern, md)
        assert i0.shape == i1.shape and torch.equal(c0, c1)
        n = torch.arange(i0.shape[-1], device="cuda") < c0[..., None]
        assert torch.equal(torch.where(n, i0, -2), torch.where(n, i1, -2)), (nq, md)


@cuda
@needs_triton
def test_model_paths_agree_on_gpu():
    """A tiny Llama on CUDA: ppa 'auto' (Triton prefill, Triton decode) matches ppa 'sdpa_mask' logits, right padding
    included, and a cached decoding step matches the full forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import ppa_hf

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 512, (2, 1537), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, -200:] = 0  # right padding
    logits = {}
    for backend in ("sdpa_mask", "auto", "flex"):
        ppa_hf.apply(model, p=0.75, backend=backend)
        with torch.no_grad():
            logits[backend] = model(ids, attention_mask=mask).logits.float()
    real = mask.bool()
    for backend in ("auto", "flex"):
        err = (logits[backend] - logits["sdpa_mask"])[real].abs().max().item()
        scale = logits["sdpa_mask"][real].abs().max().item()
        print(f"[model] {backend} vs sdpa_mask: max |diff| {err:.3e} (logit scale {scale:.2f})")
        assert err < 0.05 * scale
    # cached decoding: prefill 1536 tokens, then one step, vs the full forward's last position
    ppa_hf.apply(model, p=0.75, backend="auto")
    with torch.no_grad():
        out = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], **{CACHE: getattr(out, CACHE)}, use_cache=True).logits[:, -1].float()
        ppa_hf.apply(model, p=0.75, backend="sdpa_mask")
        full = model(ids).logits[:, -1].float()
    err = (step - full).abs().max().item()
    print(f"[model] cached decode step vs full forward: max |diff| {err:.3e}")
    assert err < 0.05 * full.abs().max().item()


@cuda
def test_left_padded_generation_auto_matches_sdpa_mask_on_gpu():
    """Batched, left-padded greedy generation on CUDA (prompts shorter than DECODE_MIN_KEYS, so the cache stays
    short): 'auto' gives the same tokens as 'sdpa_mask' in fp32, and routes short-cache decoding to the dense-mask
    path rather than recompiling FlexAttention for every cache length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import ppa_hf
    from ppa_hf.hf.dispatch import choose_path
    from ppa_hf.hf.settings import read_settings

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda().eval()
    ids = torch.randint(3, 512, (3, 301), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :120] = 0  # left padding
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    out = {}
    for backend in ("sdpa_mask", "auto"):
        ppa_hf.apply(model, p=0.5, window=16, backend=backend)
        with torch.no_grad():
            out[backend] = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                                          min_new_tokens=40)
    assert torch.equal(out["auto"], out["sdpa_mask"])
    settings = read_settings(model.config, 0)
    q = torch.randn(3, 4, 1, 32, device="cuda")
    k = torch.randn(3, 2, 340, 32, device="cuda")
    assert choose_path(settings, q, k, k, None, 0.0) == "sdpa_mask"


@cuda
@needs_triton
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
def test_triton_every_supported_head_size(head_dim):
    from ppa_hf.ops.triton import SUPPORTED_HEAD_DIMS, triton_decode_attention, triton_ppa_attention

    assert head_dim in SUPPORTED_HEAD_DIMS
    for pattern in (PPAPattern(0.75, 32, 1), PPAPattern(0.75, 32, 0, "block", 64)):
        _check("triton", lambda a, b, c: triton_ppa_attention(a, b, c, pattern), pattern, 1, 4, 2, 333, 333, head_dim,
               torch.bfloat16)
        index, count = pattern.key_lists(torch.arange(1999, 2002, device="cuda"), 2002)
        _check("decode", lambda a, b, c: triton_decode_attention(a, b, c, index[None], count[None]), pattern, 1, 8, 2,
               3, 2002, head_dim, torch.bfloat16, grads=False)


@cuda
@needs_triton
def test_unsupported_head_size_is_refused_by_the_kernel_and_routed_by_auto():
    from ppa_hf.hf.dispatch import choose_path
    from ppa_hf.hf.settings import PPASettings
    from ppa_hf.layout import PPALayout
    from ppa_hf.ops.triton import triton_ppa_attention

    q = torch.randn(1, 4, 300, 80, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 300, 80, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head size 80"):
        triton_ppa_attention(q, k, k, PPAPattern(0.75))
    seg = torch.zeros(1, 300, dtype=torch.long, device="cuda")
    layout = PPALayout(seg, torch.arange(300, device="cuda")[None], torch.arange(300, device="cuda"), 0, 300, q_start=0)
    assert choose_path(PPASettings(0.75), q, k, k, layout, 0.0) == "sdpa_mask"
    with pytest.raises(ValueError, match="ppa_backend='triton' cannot serve this call: head size 80"):
        choose_path(PPASettings(0.75, backend="triton"), q, k, k, layout, 0.0)


def _tiny_cuda_llama(dtype=torch.bfloat16, **ppa):
    from transformers import LlamaConfig, LlamaForCausalLM

    import ppa_hf

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda().to(dtype).eval()
    if ppa:
        ppa_hf.apply(model, **ppa)
    return model


@cuda
@needs_triton
@pytest.mark.parametrize("granularity", ["token", "block"])
def test_static_cache_compiled_generation_matches_eager_dynamic(granularity):
    """generate(cache_implementation="static") compiles the decoding step (CUDA graphs) through the Triton decode
    kernel's custom op, with an explicit 'triton' backend and with 'auto' on a left-padded batch; its tokens equal
    those of eager generation with a dynamic cache (fp32, so that the compiled graph's other fusions cannot flip a
    greedy choice). fullgraph: a graph break raises instead of quietly running part of the step eagerly."""
    from transformers.generation.configuration_utils import CompileConfig

    for backend, left_pad in (("triton", 0), ("auto", 37)):
        model = _tiny_cuda_llama(torch.float32, p=0.75, window=16, sink_tokens=1, granularity=granularity,
                                 block_size=64, backend=backend)
        ids = torch.randint(3, 512, (2, 1100), device="cuda")
        mask = torch.ones_like(ids)
        mask[1, :left_pad] = 0  # auto prefills a left-padded batch of this size with the dense mask
        kw = dict(attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        with torch.no_grad():
            eager = model.generate(ids, **kw)
            static = model.generate(ids, cache_implementation="static", compile_config=CompileConfig(fullgraph=True),
                                    **kw)
        print(f"[static+compile {granularity} {backend}] differing steps:",
              (eager != static).any(0).nonzero().flatten().tolist())
        assert torch.equal(static, eager)


@cuda
@needs_triton
@pytest.mark.parametrize("granularity", ["token", "block"])
def test_decode_steps_do_not_synchronise(granularity):
    """Eager decoding steps with a static cache: no host synchronisation inside PPA (CUDA's sync debug mode raises
    on any), for the Triton decode kernel and the torch gather."""
    from transformers import StaticCache

    for backend in ("triton", "decode"):
        model = _tiny_cuda_llama(p=0.75, window=16, sink_tokens=2, granularity=granularity, block_size=64,
                                 backend=backend)
        ids = torch.randint(3, 512, (2, 1500), device="cuda")
        mask = torch.ones_like(ids)
        mask[1, :100] = 0
        cache = StaticCache(config=model.config, max_cache_len=1600)
        with torch.no_grad():
            model.config.ppa_backend = "auto"  # the left-padded prefill (it may synchronise)
            model(ids, attention_mask=mask, **{CACHE: cache}, use_cache=True)
            model.config.ppa_backend = backend
            tok = torch.randint(3, 512, (2, 1), device="cuda")
            steps = []  # inputs made before the check: creating them copies from the host
            for step in range(3):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                steps.append((mask, torch.tensor([1500 + step], device="cuda"), (mask.long().cumsum(-1) - 1)[:, -1:]))
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for step_mask, pos, position_ids in steps:
                    model(tok, attention_mask=step_mask, **{CACHE: cache}, use_cache=True, cache_position=pos,
                          position_ids=position_ids)
            finally:
                torch.cuda.set_sync_debug_mode("default")


@cuda
@needs_triton
@pytest.mark.parametrize("granularity", ["token", "block"])
def test_compiled_training_step_has_no_graph_break_on_gpu(granularity):
    """torch.compile of a training step (loss and backward) where the Triton kernels run: no graph break (the layout is
    read inside one custom op), and the eager step's loss and gradients (float32, exact dots), for unpadded, packed
    (with a cache), right- and left-padded rows."""
    from test_compile import TRAIN_CASES, compiled_training_step, training_inputs

    model = _tiny_cuda_llama(torch.float32, p=0.75, window=16, sink_tokens=1, granularity=granularity,
                             block_size=64).train()
    cases = [(case, case == "packed") for case in TRAIN_CASES] if granularity == "token" else [
        ("packed", True), ("left-padded", False)]
    for case, use_cache in cases:
        torch.manual_seed(0)
        ids, kwargs = training_inputs(case, length=700)
        ids, kwargs = ids.cuda() % 512, {k: v.cuda() for k, v in kwargs.items()}
        breaks, code, loss, eager_loss, err = compiled_training_step(model, ids, kwargs, use_cache)
        print(f"[compiled training {granularity}] {case} use_cache={use_cache}: graph breaks {breaks}, loss "
              f"{loss:.6f} / {eager_loss:.6f}, largest relative gradient error {err:.2e}")
        assert breaks == 0, case
        assert "packed_prefill_forward" in code, case  # the Triton kernels ran, not another path
        assert abs(loss - eager_loss) < 1e-4 and err < 1e-3, case


@cuda
@needs_triton
def test_reduce_overhead_compiled_prefill_matches_eager():
    """``torch.compile(model, mode="reduce-overhead")`` (CUDA graphs) on prefill calls: the packed prefill op reads
    the layout on the host and is tagged ``cudagraph_unsafe``, so Inductor leaves it out of its CUDA graphs instead
    of failing while recording; three calls (warm-up, recording, replay) give the eager logits, unpadded and left
    padded (float32)."""
    model = _tiny_cuda_llama(torch.float32, p=0.75, window=16, sink_tokens=1)
    compiled = torch.compile(model, mode="reduce-overhead")
    ids = torch.randint(3, 512, (2, 700), device="cuda")
    for left_pad in (0, 37):
        mask = torch.ones_like(ids)
        mask[1, :left_pad] = 0
        with torch.no_grad():
            eager = model(ids, attention_mask=mask).logits
            for stage in ("warm-up", "recording", "replay"):
                logits = compiled(ids, attention_mask=mask).logits.clone()
                err = (logits - eager)[mask.bool()].abs().max().item()
                print(f"[reduce-overhead prefill] left_pad={left_pad} {stage}: max |diff| {err:.2e}")
                assert err < 1e-3


@cuda
@needs_triton
@pytest.mark.parametrize("head_dim,granularity", [(64, "token"), (128, "token"), (128, "block")])
def test_eager_packed_training_runs_the_unpacked_triton_kernels(head_dim, granularity):
    """An eager training step on one row of 4200 tokens packed with three sequences (above 4096 x 4096 pairs):
    ``auto`` runs the unpacked Triton kernels at both head sizes and granularities, and the loss and every gradient
    match the dense-mask path's (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import ppa_hf
    from ppa_hf.hf import dispatch

    cfg = LlamaConfig(vocab_size=256, hidden_size=4 * head_dim, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda().train()
    ids = torch.randint(0, 256, (1, 4200), device="cuda")
    pid = torch.cat([torch.arange(n, device="cuda") for n in (2000, 1500, 700)])[None]
    paths, run_path = [], dispatch.run_path

    def recording(path, *args, **kwargs):
        paths.append(path)
        return run_path(path, *args, **kwargs)

    results = {}
    try:
        dispatch.run_path = recording
        for backend in ("sdpa_mask", "auto"):
            ppa_hf.apply(model, p=0.75, window=64, backend=backend, granularity=granularity, block_size=128)
            model.zero_grad(set_to_none=True)
            loss = model(ids, position_ids=pid, labels=ids).loss
            loss.backward()
            results[backend] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    finally:
        dispatch.run_path = run_path
    assert paths == ["sdpa_mask"] * 2 + ["triton_layout"] * 2, paths
    (ref_loss, ref_grads), (loss, grads) = results["sdpa_mask"], results["auto"]
    err = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(grads, ref_grads))
    print(f"[packed training] head size {head_dim}, {granularity}: {paths[-1]}, loss {loss:.6f} / {ref_loss:.6f}, "
          f"largest relative gradient error {err:.2e}")
    assert abs(loss - ref_loss) < 1e-4 * abs(ref_loss) and err < 1e-3


@cuda
@needs_triton
def test_launch_configurations_too_large_for_the_gpu_fall_back(monkeypatch):
    """Launch configurations that need more shared memory than this GPU has (forced through the overrides: 256 x 128
    tiles over 4 stages at head size 128, a 64 KB tile resident and at least three 64 KB stages streamed, more than an
    H100's or H200's 227 KB) make Triton refuse the launch before it runs; the prefill kernels then run in smaller
    configurations that fit, with a warning naming each, and the results keep the tolerance rule, forward, every
    gradient and decoding."""
    from ppa_hf.ops.triton import common, decode, triton_decode_attention, triton_ppa_attention

    for name in ("PPA_TRITON_FWD", "PPA_TRITON_DKDV", "PPA_TRITON_DQ"):
        monkeypatch.setenv(name, "256,128,8,4")
    decode.set_decode_config((2, 256, 4, 4))
    try:
        pattern = PPAPattern(0.75, 64)
        with pytest.warns(UserWarning, match="does not fit this GPU") as caught:
            _check("prefill, too large", lambda a, b, c: triton_ppa_attention(a, b, c, pattern), pattern, 1, 8, 2,
                   1000, 1000, 128, torch.bfloat16)
            keep = _keep(pattern, 4, 1000)
            count = keep.sum(-1)
            index = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[:, :int(count.max())]
            _check("decode, too large", lambda a, b, c: triton_decode_attention(a, b, c, index[None], count[None]),
                   pattern, 2, 8, 2, 4, 1000, 128, torch.bfloat16, grads=False)
        sites = {str(w.message).split(" kernel's")[0] for w in caught}
        print("fell back:", [str(w.message) for w in caught], {k: v for k, v in common._FITTED.items()})
        # (whether the decode kernel's 256-row tiles over 4 stages overflow depends on how Triton stages its gathered
        # loads: printed above, not asserted)
        assert sites >= {"ppa_hf: the forward", "ppa_hf: the dK/dV", "ppa_hf: the dQ"}, sites
    finally:
        decode.set_decode_config(None)
