"""torch.compile through PPA on CPU: a static-cache decoding step traces with no more graph breaks than stock sdpa's
(no host synchronisation, no data-dependent Python), and the compiled step gives the eager step's logits. The GPU
side (Triton custom ops, CUDA graphs, generate(cache_implementation="static")) is in tests/test_gpu_kernels.py."""

import pytest
import torch
import torch._dynamo as dynamo
from transformers import AutoModelForCausalLM, StaticCache

import ppa_hf  # noqa: F401
from ppa_hf.models import tiny_config
from transformers_compat import CACHE

SETTINGS = [
    dict(ppa_p=0.5, ppa_window=4),  # auto: the dense-mask path for a short cache
    dict(ppa_p=0.75, ppa_window=4, ppa_sink_tokens=2, ppa_backend="decode"),  # gathered decoding
    dict(ppa_p=0.5, ppa_window=4, ppa_granularity="block", ppa_block_size=8, ppa_backend="decode"),
]


def _model_and_step(family, attn, settings):
    torch.manual_seed(0)
    config = tiny_config(family, **settings)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    ids = torch.randint(1, 128, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    cache = StaticCache(config=config, max_cache_len=96)
    with torch.no_grad():
        nxt = model(ids, attention_mask=mask, **{CACHE: cache}, use_cache=True).logits[:, -1:].argmax(-1)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)

    def step():
        with torch.no_grad():
            return model(nxt, attention_mask=step_mask, **{CACHE: cache}, use_cache=True,
                         cache_position=torch.tensor([40]), position_ids=torch.tensor([[40], [31]])).logits

    return step


def _breaks(step) -> int:
    dynamo.reset()
    return dynamo.explain(step)().graph_break_count


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_static_cache_decode_step_has_no_more_graph_breaks_than_sdpa(family):
    stock = _breaks(_model_and_step(family, "sdpa", {}))
    for settings in SETTINGS:
        ppa = _breaks(_model_and_step(family, "ppa", settings))
        print(f"{family} {settings}: graph breaks ppa {ppa}, sdpa {stock}")
        assert ppa <= stock, (settings, ppa, stock)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s.get("ppa_backend", "auto") + s.get("ppa_granularity", ""))
def test_compiled_decode_step_matches_eager(settings):
    # a step writes its token into the static cache: each run gets its own (identical) model, cache and prefill
    eager = _model_and_step("llama", "ppa", settings)()
    dynamo.reset()
    compiled = torch.compile(_model_and_step("llama", "ppa", settings), backend="aot_eager", fullgraph=True)()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("settings", SETTINGS[1:2], ids=["decode"])
def test_generate_with_static_cache_compiles_without_graph_breaks(settings):
    """`generate(cache_implementation="static")` as Transformers runs it (its own compilation of the decoding step,
    here forced onto the CPU with fullgraph=True, so a graph break raises) gives the eager dynamic-cache tokens.
    Guards against state that a compiled step would have to replay, such as a memo stored on the layout."""
    from transformers.generation.configuration_utils import CompileConfig

    torch.manual_seed(0)
    config = tiny_config("llama", **settings)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="ppa").eval()
    ids = torch.randint(1, 128, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager", dynamic=False)
    compile_config._compile_all_devices = True  # Transformers compiles on CUDA only unless told
    kwargs = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    dynamo.reset()
    with torch.no_grad():
        eager = model.generate(ids, **kwargs)
        compiled = model.generate(ids, cache_implementation="static", compile_config=compile_config, **kwargs)
    assert torch.equal(compiled, eager)


def test_single_sequence_flex_block_mask_under_compile():
    """The tables-built BlockMask of one unpadded sequence inside a compiled function: its numpy host work runs
    eagerly (Dynamo traced it into CPU tensor ops before, one of which does not exist: a boolean cumsum) and the
    compiled call gives the eager output."""
    from ppa_hf.ops.flex import _FLEX, flex_attention_ppa, flex_available, single_sequence_block_mask
    from ppa_hf.pattern import PPAPattern

    if not flex_available():
        pytest.skip("FlexAttention needs torch >= 2.5")
    pattern = PPAPattern(0.75, 16, 0, "block", 64)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 300, 64), torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)

    def attend(q, k, v):
        return flex_attention_ppa(q, k, v, single_sequence_block_mask(pattern, 300, 300, q.device))

    _FLEX.clear()  # a miss while tracing: the mask is built inside the compiled call
    dynamo.reset()
    compiled = torch.compile(attend)(q, k, v)
    _FLEX.clear()
    assert (compiled - attend(q, k, v)).abs().max().item() < 1e-5


TRAIN_CASES = ["plain", "packed", "right-padded", "left-padded"]


def training_inputs(case: str, length: int = 40):
    """``(ids, kwargs)`` of a tiny training batch of 2 rows: no padding, two packed sequences per row (restarting
    position ids), right padding, or left padding."""
    ids = torch.randint(1, 128, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    if case == "packed":
        first = length * 5 // 8
        return ids, dict(position_ids=torch.cat([torch.arange(first), torch.arange(length - first)])[None].expand(2, -1))
    if case == "right-padded":
        mask[1, length * 33 // 40:] = 0
        return ids, dict(attention_mask=mask)
    if case == "left-padded":
        mask[1, :length * 7 // 40] = 0
        return ids, dict(attention_mask=mask)
    return ids, {}


def compiled_training_step(model, ids, kwargs: dict, use_cache: bool):
    """One training step (loss and backward) of ``model`` eagerly, then traced and compiled. Returns ``(graph
    breaks, the traced graphs' code, compiled loss, eager loss, largest gradient difference relative to the largest
    eager gradient)``."""
    def loss_fn():
        return model(ids, labels=ids, use_cache=use_cache, **kwargs).loss

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = step()  # also builds the pattern's tables, as a first eager step would
    dynamo.reset()
    explained = dynamo.explain(loss_fn)()
    code = "\n".join(str(m.code) for g in explained.graphs for m in g.modules() if hasattr(m, "code"))
    loss, grads = torch.compile(step)()
    err = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(grads, eager_grads))
    return explained.graph_break_count, code, loss.item(), eager_loss.item(), err


@pytest.mark.parametrize("case", TRAIN_CASES)
@pytest.mark.parametrize("use_cache", [False, True])
def test_compiled_training_step_has_no_graph_break_and_matches_eager(case, use_cache):
    """A training step (loss and backward) under torch.compile traces with no graph break, as stock sdpa's does, and
    gives the eager step's loss and gradients: padding and packed sequences included (on a CPU ``auto`` runs the
    dense-mask path, on the layout re-linked by the position ids without a branch). Where the Triton kernels run,
    see tests/test_triton_interpret.py (CPU) and tests/test_gpu_kernels.py."""
    torch.manual_seed(0)
    config = tiny_config("llama", ppa_p=0.75, ppa_window=4)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="ppa").train()
    ids, kwargs = training_inputs(case)
    breaks, _, loss, eager_loss, err = compiled_training_step(model, ids, kwargs, use_cache)
    print(f"{case} use_cache={use_cache}: graph breaks {breaks}, loss {loss:.6f} / {eager_loss:.6f}, relative "
          f"gradient error {err:.2e}")
    assert breaks == 0
    assert abs(loss - eager_loss) < 1e-5 and err < 1e-5
