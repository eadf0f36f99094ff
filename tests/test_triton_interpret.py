"""The Triton kernels on CPU through the Triton interpreter (TRITON_INTERPRET=1), tiny shapes, fp32, against the
float64 reference: forward and every gradient of the block-sparse kernel (token and block granularity, sinks, a
model sliding window, GQA, odd lengths, q_len != kv_len) with pointer loads and through tensor descriptors, the
word-mask and the element-mask variants, and the fused decode kernel and its index-list kernel (against the torch
index list), how decoding calls are routed (float32, gradients), and the custom ops torch.compile sees
(torch.library.opcheck). Runs in a subprocess because Triton reads TRITON_INTERPRET when the kernels are defined."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import os, torch
    from ppa_hf.pattern import PPAPattern
    from ppa_hf.ops.triton import triton_ppa_attention, triton_decode_attention
    from ppa_hf.ops.triton import decode
    from ppa_hf.ops.reference import reference_attention
    torch.manual_seed(0)
    def run(pat, B, H, Hkv, Lq, Lk, D, md=None, strided=False):
        # strided: laid out [B, L, heads, D] underneath, as Transformers makes them
        q, k, v = (torch.randn(B, n, h, D).transpose(1, 2) if strided else torch.randn(B, h, n, D)
                   for n, h in ((Lq, H), (Lk, Hkv), (Lk, Hkv)))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        o = triton_ppa_attention(q, k, v, pat, max_distance=md)
        do = torch.randn_like(o)
        g = torch.autograd.grad(o, (q, k, v), do)
        keep = pat.keep(torch.arange(Lk - Lq, Lk)[:, None], torch.arange(Lk)[None], length=Lk + 1, max_distance=md)
        x = [t.detach().double().requires_grad_() for t in (q, k, v)]
        r = reference_attention(*x, keep)
        gr = torch.autograd.grad(r, x, do.double())
        for name, a, b in zip(["out", "dq", "dk", "dv"], (o,) + g, (r,) + gr):
            err = (a.double() - b).abs().max().item()
            print(os.environ.get("PPA_TRITON_TMA", "-"), pat.name, Lq, Lk, name, err)
            assert err < 1e-4, (pat.name, name, err)
    cases = [(PPAPattern(0.75, 8), 1, 4, 2, 77, 77, 16), (PPAPattern(0.5, 4, 2), 2, 2, 1, 50, 83, 16),
             (PPAPattern(0.75, 4, 0, "block", 16), 1, 2, 2, 70, 70, 16, 40), (PPAPattern(1.0), 1, 2, 1, 33, 33, 32)]
    for case in cases:
        run(*case)
    # the same through tensor descriptors (PPA_TRITON_TMA=1; Hopper GPUs take them by default) on strided inputs
    os.environ["PPA_TRITON_TMA"] = "1"
    from ppa_hf.ops.triton import prefill
    strided = torch.randn(1, 40, 2, 16).transpose(1, 2)
    assert prefill._Ctx(PPAPattern(0.75, 8), strided, strided, 0, 0, None).sources(strided, rows=16)[1]
    for case in cases:
        run(*case, strided=True)
    del os.environ["PPA_TRITON_TMA"]
    os.environ["PPA_TRITON_WORDS"] = "0"
    run(PPAPattern(0.875, 6, 1), 1, 2, 1, 61, 61, 16)
    for pat, (B, H, Hkv, Q) in [(PPAPattern(0.75, 8, 1), (2, 4, 2, 3)), (PPAPattern(0.5, 8, 0, "block", 16), (2, 4, 2, 3)),
                                (PPAPattern(0.75, 8, 3), (1, 2, 1, 1))]:  # the last: one program, several splits
        T, D = 200, 16
        q, k, v = torch.randn(B, H, Q, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
        keep = pat.keep(torch.arange(T - Q, T)[:, None], torch.arange(T)[None])
        index, count = pat.key_lists(torch.arange(T - Q, T), T)
        index, count = index[None], count[None]
        r = reference_attention(q.double(), k.double(), v.double(), keep)
        # eager calls combine the splits inside the decode kernel; the custom op runs a combine kernel after it
        for fused in (True, False):
            o = decode._decode(q, k, v, index, count, 0.25, fused=fused)
            err = (o.double() - r).abs().max().item()
            print("decode", pat.name, "fused" if fused else "combine kernel", err)
            assert err < 1e-4
        assert torch.equal(triton_decode_attention(q, k, v, index, count), decode._decode(q, k, v, index, count, 0.25))
        for config in ((1, 64, 4, 3), (64, 32, 2, 2)):  # launch configurations: one split, as many as the list allows
            decode.set_decode_config(config)
            err = (decode._decode(q, k, v, index, count, 0.25).double() - r).abs().max().item()
            print("decode", pat.name, "launch", config, err)
            assert err < 1e-4
        decode.set_decode_config(None)
    try:
        decode.set_decode_config((2, 48, 4, 3))
        raise AssertionError("a BLOCK_N that is not a power of two was accepted")
    except ValueError as err:
        assert "BLOCK_N a power of two" in str(err), err
    # the decode index list in one kernel against the torch version: left padding, holes, a row of two real tokens,
    # sinks, block granularity, a model window, several queries, keys before those handed to attention
    import itertools
    from ppa_hf.layout import PPALayout
    from ppa_hf.ops.gather import decode_index
    from ppa_hf.ops.triton import triton_decode_index
    T = 300
    valid = torch.ones(4, T, dtype=torch.bool)
    valid[1, :120] = False
    valid[2, torch.rand(T) < 0.3] = False
    valid[3, :-1] = False
    valid[3, 150] = True
    pats = [PPAPattern(0.75, 8), PPAPattern(0.5, 5, 3), PPAPattern(0.0, 7, 1), PPAPattern(1.0, 4),
            PPAPattern(0.625, 6, 2, "block", 16), PPAPattern(0.75, 4, 0, "block", 8)]
    for pat, md, Q, kv_offset in itertools.product(pats, (None, 40), (1, 3), (0, 5)):
        def make():
            return PPALayout(None, None, torch.arange(T - Q, T), kv_offset, T - kv_offset, one_sequence_per_row=True,
                             valid=valid)
        i0, c0 = decode_index(make(), pat, md)
        i1, c1 = triton_decode_index(make(), pat, md)
        assert i0.shape == i1.shape and torch.equal(c0, c1), (pat, md, Q, kv_offset)
        for b, qi in itertools.product(range(4), range(Q)):
            assert torch.equal(i0[b, qi, :c0[b, qi]], i1[b, qi, :c1[b, qi]]), (pat, md, Q, kv_offset, b, qi)
    # a row longer than one scan step of the kernel (4096 tokens): the running rank carries over
    long_valid = torch.rand(2, 9000) < 0.8
    for pat in (PPAPattern(0.75, 8), PPAPattern(0.625, 6, 2, "block", 16)):
        def make():
            return PPALayout(None, None, torch.arange(8998, 9000), 0, 9000, one_sequence_per_row=True, valid=long_valid)
        i0, c0 = decode_index(make(), pat)
        i1, c1 = triton_decode_index(make(), pat)
        assert torch.equal(c0, c1) and c0.max() > 250
        for b, qi in itertools.product(range(2), range(2)):
            assert torch.equal(i0[b, qi, :c0[b, qi]], i1[b, qi, :c1[b, qi]]), (pat, b, qi)
    print("decode index lists equal")
    # a whole decoding step of a tiny Llama (left padding, sinks): the Triton path (index kernel, fused decode)
    # against the dense-mask path on the same cache, float32
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
    import ppa_hf
    from ppa_hf.hf import dispatch
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 128, (3, 1101))
    mask = torch.ones_like(ids)
    mask[1, :300] = 0
    mask[2, :5] = 0
    paths, run_path = [], dispatch.run_path
    dispatch.run_path = lambda path, *a, **k: paths.append(path) or run_path(path, *a, **k)
    logits = {}
    for backend in ("triton", "sdpa_mask"):
        ppa_hf.apply(model, p=0.75, window=16, sink_tokens=2, backend="sdpa_mask")
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache)
            ppa_hf.apply(model, p=0.75, window=16, sink_tokens=2, backend=backend)
            logits[backend] = model(ids[:, -1:], attention_mask=mask, past_key_values=cache).logits
    dispatch.run_path = run_path
    err = (logits["triton"] - logits["sdpa_mask"]).abs().max().item()
    print("model decode step, triton vs sdpa_mask", err, paths[:4])
    assert paths[:4] == ["sdpa_mask", "sdpa_mask", "triton_decode", "triton_decode"] and err < 1e-5
    # routing of decoding calls: float32 goes to the decode kernel (exact dots); where gradients are needed, 'auto'
    # takes the torch gather (the kernel has no backward pass) and an explicit 'triton' is refused
    from ppa_hf.hf.dispatch import choose_path
    from ppa_hf.hf.settings import PPASettings
    qd, kd = torch.randn(1, 4, 1, 16, requires_grad=True), torch.randn(1, 2, 1100, 16)
    assert choose_path(PPASettings(0.75), qd.detach(), kd, kd, None, 0.0) == "triton_decode"
    assert choose_path(PPASettings(0.75), qd, kd, kd, None, 0.0) == "gather_decode"
    with torch.no_grad():
        assert choose_path(PPASettings(0.75), qd, kd, kd, None, 0.0) == "triton_decode"
    try:
        choose_path(PPASettings(0.75, backend="triton"), qd, kd, kd, None, 0.0)
        raise AssertionError("an explicit triton decode with gradients was not refused")
    except ValueError as err:
        assert "no backward pass" in str(err), err
    # training a block pattern at head size 128 on unpadded rows: the Triton kernels, eagerly and under
    # torch.compile (with descriptor loads their forward + backward beat FlexAttention's there)
    from unittest import mock
    from ppa_hf.hf.mask import ppa_mask_interface
    layout = ppa_mask_interface(1, 40, 40, device="cpu")
    qt, kt = torch.randn(1, 4, 40, 128, requires_grad=True), torch.randn(1, 2, 40, 128)
    block = PPASettings(0.75, granularity="block", block_size=16)
    assert choose_path(block, qt, kt, kt, layout, 0.0) == "triton"
    with mock.patch("torch.compiler.is_compiling", return_value=True):
        assert choose_path(block, qt, kt, kt, layout, 0.0) == "triton"
    # the custom ops that torch.compile sees: schema, fake tensors, autograd registration, AOT dispatch
    from ppa_hf.ops.triton import prefill  # noqa: F401  (registers the ops)
    q, k, v = (torch.randn(1, h, 40, 16, requires_grad=True) for h in (2, 1, 1))
    res = torch.library.opcheck(torch.ops.ppa_hf.prefill_forward.default,
                                (q, k, v, [0.75, 8, 1, 128], "token", 0, 0, None, 0.25))
    assert set(res.values()) == {"SUCCESS"}, res
    index, count = PPAPattern(0.75, 8, 1).key_lists(torch.arange(37, 40), 40)
    res = torch.library.opcheck(torch.ops.ppa_hf.triton_decode.default,
                                (torch.randn(1, 2, 3, 16), k.detach(), v.detach(), index[None], count[None], 0.25))
    assert set(res.values()) == {"SUCCESS"}, res
    print("ALL OK")
""")


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0 and "ALL OK" in proc.stdout


LAYOUTS = textwrap.dedent("""
    import torch
    from ppa_hf.pattern import PPAPattern
    from ppa_hf.ops.reference import layout_keep, reference_attention
    from ppa_hf.ops.triton import triton_layout_attention
    from test_gpu_kernels import packed_layouts
    torch.manual_seed(0)
    for pattern, Hkv, md in ((PPAPattern(0.75, 4), 2, None), (PPAPattern(0.5, 4, 2, "block", 8), 1, 20)):
        for name, layout in packed_layouts(2, 97, device="cpu").items():
            Q = layout.q_index.numel()
            q = torch.randn(2, 4, Q, 16, requires_grad=True)
            k, v = (torch.randn(2, Hkv, 97, 16, requires_grad=True) for _ in range(2))
            out = triton_layout_attention(q, k, v, layout, pattern, max_distance=md)
            do = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v), do)
            x = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref = reference_attention(*x, layout_keep(layout, pattern, md))
            ref_grads = torch.autograd.grad(ref, x, do.double())
            for label, a, b in zip(["out", "dq", "dk", "dv"], (out,) + grads, (ref,) + ref_grads):
                err = (a.double() - b).abs().max().item()
                print(pattern.name, name, label, err)
                assert err < 1e-4, (pattern.name, name, label, err)
    # one row whose length is whole tiles (the LSE copies between the layout and the unpacked rows must not alias),
    # packed with sequences of unequal lengths (empty slots in the rows) and of equal ones (none: no fill pass)
    from benchmarks.run import packed_layout
    for name, layout in (("unequal", packed_layouts(1, 128, device="cpu")["packed"]),
                         ("equal", packed_layout(128, 4, "cpu")[0])):
        q, k, v = (torch.randn(1, h, 128, 16, requires_grad=True) for h in (2, 1, 1))
        out = triton_layout_attention(q, k, v, layout, PPAPattern(0.75, 4))
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        x = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = reference_attention(*x, layout_keep(layout, PPAPattern(0.75, 4)))
        ref_grads = torch.autograd.grad(ref, x, torch.ones_like(ref))
        errs = [(a.double() - b).abs().max().item() for a, b in zip((out,) + grads, (ref,) + ref_grads)]
        print("one packed row of 128,", name, "lengths", errs)
        assert max(errs) < 1e-4, errs
    # an explicit triton backend takes packed and left-padded prefill calls, and refuses keys not from kv index 0
    from ppa_hf.hf.dispatch import choose_path
    from ppa_hf.hf.settings import PPASettings
    from ppa_hf.layout import PPALayout
    settings = PPASettings(0.75, window=4, backend="triton")
    q, k = torch.randn(2, 4, 97, 16), torch.randn(2, 2, 97, 16)
    assert choose_path(settings, q, k, k, packed_layouts(2, 97, device="cpu")["left-padded"], 0.0) == "triton_layout"
    valid = torch.ones(2, 120, dtype=torch.bool)
    valid[1, :30] = False
    shifted = PPALayout(None, None, torch.arange(23, 120), 23, 97, one_sequence_per_row=True, valid=valid)
    for call in (lambda: choose_path(settings, q, k, k, shifted, 0.0),
                 lambda: triton_layout_attention(q, k, k, shifted, PPAPattern(0.75, 4))):
        try:
            call()
            raise AssertionError("keys not from kv index 0 were not refused")
        except ValueError as err:
            assert "kv_offset=23" in str(err), err
    # eager auto on packed or left-padded rows above 4096 x 4096 pairs (on a GPU: the seam says so): the unpacked
    # Triton kernels; keys not from kv index 0 -> Flex; on a CPU the dense mask
    from unittest import mock
    from ppa_hf.hf import dispatch
    big = packed_layouts(1, 4200, device="cpu")
    big["shifted"] = PPALayout(None, None, torch.arange(23, 4200), 23, 4177, one_sequence_per_row=True,
                               valid=big["left-padded"].valid)
    for D, gran, want in ((64, "token", "triton_layout"), (64, "block", "triton_layout"),
                          (128, "token", "triton_layout"), (128, "block", "triton_layout")):
        settings = PPASettings(0.75, window=4, granularity=gran, block_size=16)
        for name in ("packed", "left-padded", "shifted"):
            q = torch.randn(1, 4, big[name].q_index.numel(), D)
            k = torch.randn(1, 2, big[name].kv_length, D)
            assert choose_path(settings, q, k, k, big[name], 0.0) == "sdpa_mask", (D, gran, name)
            with mock.patch.object(dispatch, "_on_gpu", return_value=True):
                path = choose_path(settings, q, k, k, big[name], 0.0)
                assert path == ("flex" if name == "shifted" else want), (D, gran, name, path)
                small = choose_path(settings, q[:, :, :2000], k[:, :, :2000], k[:, :, :2000], big[name], 0.0)
                assert small == "sdpa_mask", (D, gran, name, small)
    # the custom ops torch.compile sees: schema, fake tensors, autograd registration, AOT dispatch
    layout = packed_layouts(2, 40, device="cpu")["packed"]
    q, k, v = (torch.randn(2, h, 40, 16, requires_grad=True) for h in (2, 1, 1))
    res = torch.library.opcheck(torch.ops.ppa_hf.packed_prefill_forward.default,
                                (q, k, v, layout.seg, layout.pos, layout.q_index, [0.75, 8, 1, 128], "token", None,
                                 0.25, False))
    assert set(res.values()) == {"SUCCESS"}, res
    # eager calls reuse the layout's plan; compiled ones plan every call (a CUDA-graph replay can refill the layout's
    # tensors without a version bump)
    from unittest import mock
    from ppa_hf.ops.triton import packed, triton_layout_attention
    reuse, plan = [], packed._layout_plan
    with mock.patch.object(packed, "_layout_plan", side_effect=lambda *a: reuse.append(a[3]) or plan(*a)):
        pat = PPAPattern(0.75, 4)
        eager = triton_layout_attention(q, k, v, layout, pat)
        compiled = torch.compile(lambda a, b, c: triton_layout_attention(a, b, c, layout, pat), backend="aot_eager",
                                 fullgraph=True)(q, k, v)
    assert reuse == [True, False] and torch.allclose(eager, compiled), reuse
    if hasattr(torch.Tag, "cudagraph_unsafe"):  # the host reads: CUDA graphs must leave these ops out
        for op in (torch.ops.ppa_hf.packed_prefill_forward, torch.ops.ppa_hf.packed_prefill_backward):
            assert torch.Tag.cudagraph_unsafe in op.default.tags, op
    print("ALL OK")
""")

COMPILED_TRAINING = textwrap.dedent("""
    import torch
    from transformers import AutoModelForCausalLM
    import ppa_hf
    from ppa_hf.models import tiny_config
    from test_compile import TRAIN_CASES, compiled_training_step, training_inputs
    runs = [("token", case, False) for case in TRAIN_CASES] + [("block", "packed", True), ("block", "left-padded", True)]
    for granularity, case, use_cache in runs:
        torch.manual_seed(0)
        config = tiny_config("llama", ppa_p=0.75, ppa_window=4, ppa_granularity=granularity, ppa_block_size=8)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="ppa").train()
        ids, kwargs = training_inputs(case)
        breaks, code, loss, eager_loss, err = compiled_training_step(model, ids, kwargs, use_cache)
        print(granularity, case, "use_cache", use_cache, "graph breaks", breaks, "loss", loss, eager_loss,
              "relative gradient error", err)
        assert breaks == 0, case
        assert "packed_prefill_forward" in code, case  # the Triton kernels, not the dense-mask path
        assert abs(loss - eager_loss) < 1e-5 and err < 1e-5, case
    print("ALL OK")
""")


def _interpreted(script: str, timeout: int) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0 and "ALL OK" in proc.stdout


def test_triton_kernels_on_packed_and_padded_layouts():
    """The block-sparse kernels on layouts they cannot take as they are (packed sequences, left padding, a padding
    hole, a packed row whose queries are its last third; one packed row of 128 tokens), each sequence unpacked into a
    row of its own: forward and every gradient against the float64 reference on the layout's mask; an explicit ``triton`` backend routes such
    calls there and refuses keys that do not start at kv index 0; the custom op passes opcheck."""
    _interpreted(LAYOUTS, 600)


def test_unpacked_copies_round_trip_without_aliasing():
    """The copies of the unpacked path (layout order -> one sequence per row -> layout order), for tensors and for
    the LSE: every real token's values come back, padding gets zeros (+inf for the LSE), a row's empty slots hold
    zeros, and output strides follow the input's; also for one row whose length is whole tiles, where a view of the
    output buffer would alias the LSE copy into it, and with queries that are the last third of the keys. Plain
    torch (no kernels run); the plan is made with one host read, once per layout."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_gpu_kernels import packed_layouts

    from ppa_hf.ops.triton.packed import _plan
    from ppa_hf.ops.triton.prefill import _lse_len

    torch.manual_seed(0)
    # (1, 128): B = 1 and Q = 128 for the LSE copy back; (1, 163): its left-padded row is one sequence of 128 tokens
    for B, T in ((1, 128), (1, 163), (2, 97)):
        for name, layout in packed_layouts(B, T, device="cpu").items():
            kind, plan = _plan(layout.seg, layout.pos, layout.q_index)
            assert kind == "unpack", (name, kind)
            Q = layout.q_index.numel()
            real_q = (layout.seg[:, layout.q_index] >= 0)  # [B, Q]
            real_k = layout.seg >= 0  # [B, T]
            # tensors: q as Transformers makes it ([B, N, H, D] underneath), k contiguous [B, H, N, D]
            q = torch.randn(B, Q, 4, 16).transpose(1, 2)
            k = torch.randn(B, 2, T, 16)
            rq, rk = plan.to_rows(q, queries=True), plan.to_rows(k, queries=False)
            assert rq.shape == (plan.S, 4, plan.L, 16) and rk.shape == (plan.S, 2, plan.L, 16)
            filled = torch.zeros(plan.S * plan.L, dtype=torch.bool)
            filled[plan.key_slot[real_k.flatten()]] = True
            assert (rk.transpose(1, 2).reshape(plan.S * plan.L, -1)[~filled] == 0).all(), (B, T, name)
            for x, rows, queries, real in ((q, rq, True, real_q), (k, rk, False, real_k)):
                back = plan.from_rows(rows, x, queries)
                assert back.stride() == x.stride(), (B, T, name)
                mask = real[:, None, :, None].expand_as(x)
                assert torch.equal(back[mask], x[mask]) and (back[~mask] == 0).all(), (B, T, name)
            # the LSE
            lse = torch.randn(B, 4, _lse_len(q))
            back = plan.lse_from_rows(plan.lse_to_rows(lse, q, rq), q)
            real = real_q[:, None, :].expand(B, 4, Q)
            assert torch.equal(back[:, :, :Q][real], lse[:, :, :Q][real]), (B, T, name)
            assert torch.isinf(back[:, :, :Q][~real]).all() and torch.isinf(back[:, :, Q:]).all(), (B, T, name)
    # equal lengths, no padding: no empty slot and no padding anywhere, so the copies skip their fill pass
    from benchmarks.run import packed_layout
    plan = _plan(*(lambda l: (l.seg, l.pos, l.q_index))(packed_layout(128, 4, "cpu")[0]))[1]
    assert (plan.S, plan.L, plan.key_holes, plan.q_holes, plan.key_padding, plan.q_padding) == (4, 32, False, False,
                                                                                                False, False)
    # rows that are one sequence from kv index 0 (right padding at most) run as they are; no query: nothing to do
    rows = packed_layouts(2, 97, device="cpu")["hole"]
    seg = torch.where(torch.arange(97) < 90, 0, -1).expand(2, -1).clone()
    pos = torch.where(seg >= 0, torch.arange(97), 0)
    kind, (q0, k0, q_valid) = _plan(seg, pos, torch.arange(97))
    assert kind == "rows" and (q0, k0) == (0, 0) and q_valid.shape == (2, 97) and q_valid.sum() == 180
    kind, (q0, k0, q_valid) = _plan(seg[:, :90], pos[:, :90], torch.arange(30, 90))
    assert kind == "rows" and (q0, k0, q_valid) == (30, 0, None)
    # one host read per plan: count the ways a tensor reaches the host
    from unittest import mock
    reads = []
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "__bool__", "__int__", "nonzero")}

    def counting(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            return originals[name](self, *args, **kwargs)
        return read

    with mock.patch.multiple(torch.Tensor, **{name: counting(name) for name in originals}):
        for name, layout in packed_layouts(2, 97, device="cpu").items():
            reads.clear()
            assert _plan(layout.seg, layout.pos, layout.q_index)[0] == "unpack"
            assert reads == ["tolist"], (name, reads)
    kind, (q0, k0, q_valid) = _plan(torch.full((2, 97), -1), torch.zeros(2, 97, dtype=torch.long), torch.arange(97))
    assert kind == "rows" and not q_valid.any()  # only padding: the kernels' rows, every output zeroed
    assert _plan(rows.seg, rows.pos, torch.arange(0))[0] == "empty"
    # one plan per layout: the layers of a forward pass and its backward share it; an in-place change, other tensors
    # or inference tensors (no version counter) plan again
    from ppa_hf.ops.triton import packed
    with mock.patch.object(packed, "_plan", wraps=packed._plan) as planned:
        layout = packed_layouts(2, 97, device="cpu")["packed"]
        seg, pos, q_index = layout.seg.clone(), layout.pos.clone(), layout.q_index.clone()
        first = packed._layout_plan(seg, pos, q_index, True)
        assert all(packed._layout_plan(seg, pos, q_index, True) is first for _ in range(3)) and planned.call_count == 1
        pos.add_(0)  # modified in place (same values): planned again
        assert packed._layout_plan(seg, pos, q_index, True) is not first and planned.call_count == 2
        assert packed._layout_plan(seg, pos.clone(), q_index, True) is not first and planned.call_count == 3
        with torch.inference_mode():
            iseg, ipos, iq = seg.clone(), pos.clone(), q_index.clone()
        packed._layout_plan(iseg, ipos, iq, True), packed._layout_plan(iseg, ipos, iq, True)
        assert planned.call_count == 5
        packed._layout_plan(seg, pos, q_index, False), packed._layout_plan(seg, pos, q_index, False)
        assert planned.call_count == 7  # compiled calls (reuse=False) plan every time


def test_compiled_training_step_through_the_triton_kernels():
    """A compiled training step where the Triton kernels run (here under the interpreter): the layout is read inside
    one custom op, so the step traces with no graph break, and it gives the eager step's loss and gradients
    (unpadded, packed, right- and left-padded rows; with a cache too)."""
    _interpreted(COMPILED_TRAINING, 900)


def test_decode_launch_configuration_table_and_overrides(monkeypatch):
    """The decode kernel's launch comes from the measured table by program count; ``PPA_TRITON_DECODE`` and
    ``set_decode_config`` fix one for every launch (and ``None`` goes back); a bad value names itself."""
    from ppa_hf.ops.triton import decode

    monkeypatch.delenv("PPA_TRITON_DECODE", raising=False)
    decode.set_decode_config(None)
    try:
        assert [decode.decode_config(n) for n in (8, 63, 64, 255, 256, 4096)] == [
            decode.DECODE_DEFAULT, decode.DECODE_DEFAULT, (4, 64, 2, 3), (4, 64, 2, 3), (2, 64, 2, 3), (2, 64, 2, 3)]
        decode.set_decode_config((1, 32, 2, 2))
        assert decode.decode_config(8) == decode.decode_config(256) == (1, 32, 2, 2)
        monkeypatch.setenv("PPA_TRITON_DECODE", "8,128,4,2")
        decode.set_decode_config(None)  # back to the environment, read again
        assert decode.decode_config(64) == (8, 128, 4, 2)
        monkeypatch.setenv("PPA_TRITON_DECODE", "2,64,3,3")
        decode.set_decode_config(None)
        for _ in range(2):  # every call: a bad value never falls back to the table
            with pytest.raises(ValueError, match=r"PPA_TRITON_DECODE=\(2, 64, 3, 3\).*num_warps a power of two"):
                decode.decode_config(8)
        monkeypatch.setenv("PPA_TRITON_DECODE", "2,64,four,3")
        with pytest.raises(ValueError, match="PPA_TRITON_DECODE='2,64,four,3': a launch configuration is four"):
            decode.decode_config(8)
    finally:
        monkeypatch.delenv("PPA_TRITON_DECODE", raising=False)
        decode.set_decode_config(None)


def test_descriptor_loads_by_gpu_head_size_and_direction(monkeypatch):
    """Where the prefill kernels read through tensor descriptors by default: compute capability 9+ only, the forward
    at head sizes 64 and 128 and the backward at 128 (measured; other head sizes keep pointer loads); ``PPA_TRITON_TMA`` forces either way, a bad
    value names itself; the forward's launch configuration follows (4 warps, 2 stages through descriptors); a tensor
    that cannot back a descriptor keeps pointer loads. (The kernels through descriptors, forward and every gradient:
    :func:`test_triton_kernels_under_interpreter`.)"""
    import torch

    from ppa_hf.ops.triton import common, prefill
    from ppa_hf.pattern import PPAPattern

    monkeypatch.delenv("PPA_TRITON_TMA", raising=False)
    monkeypatch.setattr(common, "interpreted", lambda device: False)  # as on a CUDA device
    for capability, head_dim, direction, want in ((9, 64, "forward", True), (9, 64, "backward", False),
                                                   (9, 128, "backward", True), (10, 128, "forward", True),
                                                   (9, 256, "forward", False), (9, 32, "forward", False),
                                                   (8, 128, "forward", False), (8, 64, "backward", False)):
        monkeypatch.setattr(common, "gpu_capability", lambda device, c=capability: (c, 0))
        assert common.tma_wanted("cuda", head_dim, direction) is want, (capability, head_dim, direction)
        fwd = prefill.configs(head_dim, torch.bfloat16, "cuda")[0]
        assert (fwd == (128, 64, 4, 2)) is (capability >= 9 and head_dim in (64, 128)), (capability, head_dim, fwd)
    monkeypatch.setattr(common, "gpu_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.version, "hip", "6.2")  # an AMD GPU reporting 9.x (MI200/MI300): no Hopper TMA
    assert not common.tma_wanted("cuda", 128, "forward")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setenv("PPA_TRITON_TMA", "0")
    assert not common.tma_wanted("cuda", 128, "forward")
    assert prefill.configs(128, torch.bfloat16, "cuda")[0] == (128, 64, 8, 3)
    monkeypatch.setenv("PPA_TRITON_TMA", "1")
    assert common.tma_wanted("cuda", 64, "backward")
    odd = torch.randn(2 * 40 * 16 + 1)[1:].view(1, 2, 40, 16)  # a base 4 bytes off 16-byte alignment
    assert not common.tma_ready(odd) and common.tma_ready(odd.clone())
    ctx = prefill._Ctx(PPAPattern(0.75, 8), odd, odd, 0, 0, None)
    ctx.device = torch.device("cuda")  # (the rule as on a GPU; nothing is launched)
    assert ctx.sources(odd, rows=16) == ((odd,), False)
    monkeypatch.setenv("PPA_TRITON_TMA", "on")
    with pytest.raises(ValueError, match="PPA_TRITON_TMA='on'"):
        common.tma_wanted("cuda", 64, "forward")


SMALL_GPU = textwrap.dedent("""
    import warnings
    import torch
    from triton.runtime.errors import OutOfResources
    from ppa_hf.pattern import PPAPattern
    from ppa_hf.ops.reference import reference_attention
    from ppa_hf.ops.triton import common, decode, prefill, triton_ppa_attention, triton_decode_attention

    # the measured table as on a GPU (the interpreter's own is already minimal)
    prefill.configs = lambda head_dim, dtype, device: ((64, 32, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3))
    launched = []

    class SmallGPU:
        # a kernel on a GPU with little shared memory: a launch needing more than the limit fails before it runs
        def __init__(self, name, kernel, fits):
            self.name, self.kernel, self.fits = name, kernel, fits

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                config = (kwargs.get("BLOCK_M"), kwargs.get("BLOCK_N"), kwargs["num_stages"])
                if not self.fits(*config):
                    raise OutOfResources(100_000, 99_000, "shared memory")
                launched.append((self.name, config))
                return self.kernel[grid](*args, **kwargs)
            return run

    fits = lambda bm, bn, stages: bm * bn * stages <= 32 * 32 * 2
    prefill._fwd_kernel = SmallGPU("forward", prefill._fwd_kernel, fits)
    prefill._bwd_dkdv_kernel = SmallGPU("dkdv", prefill._bwd_dkdv_kernel, fits)
    prefill._bwd_dq_kernel = SmallGPU("dq", prefill._bwd_dq_kernel, fits)
    decode._decode_kernel = SmallGPU("decode", decode._decode_kernel, lambda bm, bn, stages: stages == 1)

    torch.manual_seed(0)
    pattern = PPAPattern(0.75, 8, 1)
    q = torch.randn(1, 4, 70, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 70, 16, requires_grad=True) for _ in range(2))
    keep = pattern.dense(70)[None, None]
    ref = reference_attention(q.double(), k.double(), v.double(), keep)
    do = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    for attempt in range(2):
        launched.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = triton_ppa_attention(q, k, v, pattern)
            grads = torch.autograd.grad(out, (q, k, v), do.float())
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), r.double(), atol=2e-5, rtol=2e-5)
        # each kernel ran once, in the first smaller configuration that fits: one stage fewer, then the larger tile
        # halved (64 x 32 x 2 -> 32 x 32 x 2)
        assert launched == [("forward", (32, 32, 2)), ("dkdv", (32, 32, 2)), ("dq", (32, 32, 2))], launched
        messages = [str(w.message) for w in caught if "does not fit this GPU" in str(w.message)]
        if attempt == 0:  # each named once, with the measured and the chosen configuration
            assert len(messages) == 3 and "forward kernel's launch configuration (64, 32, 4, 3)" in messages[0]
            assert "using (32, 32, 4, 2)" in messages[0], messages
        else:  # remembered: no retry, no warning
            assert messages == [], messages

    index, count = pattern.key_lists(torch.arange(66, 70), 70)
    qd = torch.randn(1, 4, 4, 16)
    out = triton_decode_attention(qd, k.detach(), v.detach(), index[None], count[None])
    keep_d = pattern.dense(4, 70)[None, None]
    torch.testing.assert_close(out.double(), reference_attention(qd.double(), k.double(), v.double(), keep_d),
                               atol=2e-5, rtol=2e-5)
    assert launched[-1] == ("decode", (None, 16, 1)), launched
    assert common.smaller_config((2, 16, 4, 1), (1,)) is None  # nothing left: the error is raised
    print("ALL OK")
""")


def test_launch_configurations_shrink_to_what_the_gpu_holds():
    """On a GPU with less shared memory than the H100/H200 the launch tables were measured on, a launch that does
    not fit (Triton's OutOfResources, raised before it runs) is retried with one stage fewer, then smaller tiles; the
    result is exact, a warning names the configuration once, and later calls start from the one that fit. Simulated
    under the interpreter with kernels that refuse configurations above a limit."""
    from ppa_hf.ops.triton.common import smaller_config

    assert smaller_config((128, 64, 8, 3), (0, 1)) == (128, 64, 8, 2)
    assert smaller_config((128, 64, 8, 2), (0, 1)) == (64, 64, 8, 2)
    assert smaller_config((64, 64, 8, 2), (0, 1)) == (64, 32, 8, 2)
    assert smaller_config((16, 16, 4, 2), (0, 1)) == (16, 16, 4, 1)
    assert smaller_config((16, 16, 4, 1), (0, 1)) is None
    assert smaller_config((2, 64, 2, 3), (1,)) == (2, 64, 2, 2)
    assert smaller_config((2, 64, 2, 2), (1,)) == (2, 32, 2, 2)
    _interpreted(SMALL_GPU, 300)


def test_gpus_below_compute_capability_8_are_refused_and_routed(monkeypatch):
    """Triton supports GPUs of compute capability 8.0 and newer (bfloat16 does not assemble below it): on an older GPU
    the kernels refuse with the reason, `auto` routes decoding to the torch gather and prefill elsewhere, and an
    explicit `triton` backend is refused with that reason. (CPU tensors stand in for a CUDA device here.)"""
    import torch

    from ppa_hf.hf.dispatch import choose_path
    from ppa_hf.hf.settings import PPASettings
    from ppa_hf.layout import PPALayout
    from ppa_hf.ops.triton import common

    monkeypatch.setattr(common, "triton_available", lambda device=None: True)
    monkeypatch.setattr(common, "interpreted", lambda device: False)  # as on a CUDA device
    qd = torch.randn(1, 4, 1, 64, dtype=torch.bfloat16)
    q = torch.randn(1, 4, 300, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 2048, 64, dtype=torch.bfloat16)
    layout = PPALayout(torch.zeros(1, 300, dtype=torch.long), torch.arange(300)[None], torch.arange(300), 0, 300,
                       q_start=0)
    monkeypatch.setattr(common, "gpu_capability", lambda device: (8, 0))
    assert common.unsupported_reason(qd, k, k) is None
    assert choose_path(PPASettings(0.75), qd, k, k, None, 0.0) == "triton_decode"
    assert choose_path(PPASettings(0.75), q, k[:, :, :300], k[:, :, :300], layout, 0.0) == "triton"
    monkeypatch.setattr(common, "gpu_capability", lambda device: (7, 5))
    reason = common.unsupported_reason(qd, k, k)
    assert reason is not None and "compute capability 8.0 or newer" in reason and "has 7.5" in reason, reason
    assert choose_path(PPASettings(0.75), qd, k, k, None, 0.0) == "gather_decode"
    assert choose_path(PPASettings(0.75), q, k[:, :, :300], k[:, :, :300], layout, 0.0) == "sdpa_mask"
    with pytest.raises(ValueError, match="ppa_backend='triton' cannot serve this call: the Triton kernels need a GPU "
                                         "of compute capability 8.0"):
        choose_path(PPASettings(0.75, backend="triton"), qd, k, k, None, 0.0)
