"""Context parallelism (ppa_hf.hf.context_parallel): one sequence split over 2 gloo processes gives the attention
output, the loss and every gradient of the whole sequence in one process (float64), with attention sinks, padding,
packed sequences, an odd length and a chunk border inside the window; the kernels the GPU routes to (block-sparse Triton, Flex from
the tables) serve a query chunk in the middle of the keys."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import ppa_hf
from ppa_hf.hf.context_parallel import ContextParallel, ContextParallelLayout, shard_batch, shift_targets
from ppa_hf.hf.dispatch import ppa_attention_forward
from ppa_hf.hf.mask import ppa_mask_interface
from ppa_hf.models import tiny_config
from ppa_hf.ops.reference import layout_keep, reference_attention
from ppa_hf.pattern import PPAPattern

# p = 0.5, window 8, 2 sinks; with 40 tokens on 2 ranks the border is at 20, so queries 20..27 reach keys of the
# other chunk through the window, later ones through far offsets and sinks
P, WINDOW, SINKS = 0.5, 8, 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _padding_mask(B, L, short_row_length):
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, short_row_length:] = 0  # row 1 right-padded
    return mask


class _Attention(torch.nn.Module):
    """What the attention function reads from a model's attention module: its config and layer index."""

    is_causal = True

    def __init__(self, config):
        super().__init__()
        self.config, self.layer_idx = config, 0


def _check_attention(context, backend):
    """One attention call: this rank's query chunk against the gathered keys equals the whole sequence's rows."""
    config = tiny_config("llama", _attn_implementation="ppa")
    ppa_hf.hf.settings.write_settings(config, P, WINDOW, SINKS, backend)
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, L, D = 2, 4, 2, 40, 8
    q, k, v = (torch.randn(B, h, L, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    grad_out = torch.randn(B, L, H, D, generator=g, dtype=torch.float64)
    mask = _padding_mask(B, L, 33)
    # row 0 packs two sequences, the second starting at token 23 (in the second chunk); row 1 is right-padded
    position_ids = torch.cat([torch.arange(L)[None], torch.arange(L)[None]])
    position_ids[0, 23:] = torch.arange(L - 23)
    # expected: explicit attention of the whole sequence on the pattern's dense keep mask
    full_layout = ppa_mask_interface(B, L, L, attention_mask=mask, config=config).with_position_ids(position_ids)
    assert int(full_layout.seg[0].max()) == 1  # two sequences in row 0
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*leaves, layout_keep(full_layout, PPAPattern(P, WINDOW, SINKS))).transpose(1, 2)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)

    batch = {"input_ids": torch.zeros(B, L, dtype=torch.long), "attention_mask": mask,
             "labels": torch.zeros(B, L, dtype=torch.long), "position_ids": position_ids}
    inputs, _ = shard_batch(batch, context, config)
    layout = inputs["attention_mask"]
    assert isinstance(layout, ContextParallelLayout)
    start, end = context.bounds(L)
    train = backend != "flex"  # FlexAttention has no backward on CPU
    chunk = [t[:, :, start:end].clone().requires_grad_(train) for t in (q, k, v)]
    out, _ = ppa_attention_forward(_Attention(config), *chunk, layout)
    torch.testing.assert_close(out, expected[:, start:end], rtol=1e-10, atol=1e-10)
    if train:
        grads = torch.autograd.grad(out, chunk, grad_out[:, start:end])
        for name, got, want in zip(("dq", "dk", "dv"), grads, expected_grads):
            torch.testing.assert_close(got, want[:, :, start:end], rtol=1e-10, atol=1e-10, msg=f"{backend} {name}")


def _check_model(context):
    """A tiny Llama: the loss (summed over the CP group) and every gradient equal the whole sequence's; an odd length
    is padded to a multiple of the group size."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama")
    model = ppa_hf.apply(AutoModelForCausalLM.from_config(config).double(), p=P, window=WINDOW, sink_tokens=SINKS)
    B, L = 2, 41
    ids = torch.randint(0, 128, (B, L), generator=torch.Generator().manual_seed(2))
    mask = _padding_mask(B, L, 30)
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :5] = -100  # loss on the "answer" only

    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    loss = F.cross_entropy(logits.flatten(0, 1), shift_targets(labels).flatten(), reduction="sum")
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    inputs, targets = shard_batch({"input_ids": ids, "attention_mask": mask, "labels": labels}, context, model.config)
    assert inputs["input_ids"].shape == (B, 21) and targets.shape == (B, 21)  # 41 tokens padded to 42
    assert inputs["position_ids"][0, 0] == 21 * context.rank  # global positions for RoPE
    chunk_logits = model(**inputs, use_cache=False).logits
    chunk_loss = F.cross_entropy(chunk_logits.flatten(0, 1), targets.flatten(), reduction="sum")
    chunk_loss.backward()
    total = chunk_loss.detach().clone()
    dist.all_reduce(total, group=context.group)
    torch.testing.assert_close(total, loss.detach(), rtol=1e-10, atol=1e-10)
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad, group=context.group)  # what DDP's gradient averaging sums (times 1 / world)
        torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-10, msg=name)


def _worker(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with pytest.raises(ValueError, match="context_parallel=3 does not divide the number of processes"):
            ContextParallel.create(3)
        context = ContextParallel.create(2)
        assert (context.size, context.rank, context.data_parallel_size) == (2, rank, 1)
        for backend in ("sdpa_mask", "decode", "flex"):
            _check_attention(context, backend)
        _check_model(context)
        # a model without PPA attention would not gather the keys: refused
        config = tiny_config("llama", _attn_implementation="sdpa")
        ppa_hf.hf.settings.write_settings(config, P, WINDOW, SINKS)
        batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "labels": torch.zeros(1, 8, dtype=torch.long)}
        with pytest.raises(ValueError, match="context parallelism runs through attn_implementation='ppa'"):
            shard_batch(batch, context, config)
        # keys that are not this rank's chunk are refused, not silently attended
        config._attn_implementation = "ppa"
        inputs, _ = shard_batch(batch, context, config)
        whole = torch.zeros(1, 2, 8, 4)
        with pytest.raises(ValueError, match="this rank's chunk has 8 keys but the layout splits 8 keys over 2"):
            ppa_attention_forward(_Attention(config), torch.zeros(1, 4, 4, 4), whole, whole, inputs["attention_mask"])
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_the_whole_sequence():
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)


def test_shift_targets_counts_each_target_once():
    labels = torch.tensor([[-100, 5, 6, 7], [-100, -100, 8, -100]])
    assert shift_targets(labels).tolist() == [[5, 6, 7, -100], [-100, 8, -100, -100]]
    # without context parallelism the batch is returned whole, with the same targets
    inputs, targets = shard_batch({"input_ids": labels.clamp(min=0), "labels": labels}, None, None)
    assert inputs["input_ids"].shape == (2, 4) and torch.equal(targets, shift_targets(labels))


def test_context_parallel_refuses_bad_sizes():
    with pytest.raises(ValueError, match="context_parallel=1 is not allowed; context_parallel must be an integer >= 2"):
        ContextParallel.create(1)
    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        ContextParallel.create(2)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on CPU, as meant
def test_flex_block_mask_from_tables_serves_a_middle_query_chunk():
    """On CUDA, Flex builds its BlockMask from the tables with a query offset: here (CPU, forward) a chunk in the
    middle of the keys, the later keys masked by causality, equals explicit attention."""
    from ppa_hf.ops.flex import flex_attention_ppa, single_sequence_block_mask

    pattern = PPAPattern(P, WINDOW, SINKS)
    L, start, end = 96, 32, 64
    q, k, v = (torch.randn(1, 2, n, 16) for n in (end - start, L, L))
    block_mask = single_sequence_block_mask(pattern, end - start, L, q.device, q_start=start, k_start=0,
                                            block_size=16)
    out = flex_attention_ppa(q, k, v, block_mask)
    keep = pattern.keep(torch.arange(start, end)[:, None], torch.arange(L)[None])
    torch.testing.assert_close(out, reference_attention(q, k, v, keep), rtol=1e-5, atol=1e-5)


TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from ppa_hf.ops.reference import reference_attention
    from ppa_hf.ops.triton import triton_ppa_attention
    from ppa_hf.pattern import PPAPattern
    torch.manual_seed(0)
    for pattern in (PPAPattern(0.5, 8, 2), PPAPattern(0.75, 8, 1, "block", 16)):
        L, start, end = 80, 24, 56  # queries in the middle of the gathered keys
        q = torch.randn(1, 4, end - start, 16, requires_grad=True)
        k, v = (torch.randn(1, 2, L, 16, requires_grad=True) for _ in range(2))
        out = triton_ppa_attention(q, k, v, pattern, q_start=start, k_start=0)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        keep = pattern.keep(torch.arange(start, end)[:, None], torch.arange(L)[None], length=L)
        x = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = reference_attention(*x, keep)
        ref_grads = torch.autograd.grad(ref, x, grad.double())
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out,) + grads, (ref,) + ref_grads):
            err = (a.double() - b).abs().max().item()
            assert err < 1e-4, (pattern.name, name, err)
        assert grads[1][:, :, end:].abs().max() == 0  # keys after the chunk: causally masked
    print("ALL OK")
""")


def test_triton_kernel_serves_a_middle_query_chunk():
    """The block-sparse Triton kernel (what CUDA routes a CP chunk to) under the Triton interpreter: queries in the
    middle of the keys, forward and every gradient against explicit attention in float64."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
