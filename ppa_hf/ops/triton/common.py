"""What the Triton kernels share: availability, supported shapes, launch configurations, the pattern's tables as
device tensors, and the one in-kernel form of the pattern's predicate (:func:`tile_mask`).

Kernels run on CUDA (bf16 / fp16 / fp32) and, for tests, on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = tl = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - a Triton without host-side descriptors: pointer loads only
    TensorDescriptor = None
try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - no Triton: nothing launches
    class OutOfResources(Exception):
        pass

from ...cache import BoundedCache
from ...pattern import PPAPattern

LOG2E = 1.4426950408889634
# Triton reads TRITON_INTERPRET when a kernel is defined (at import); read here once too (every call checks it)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Head sizes whose kernels read through tensor descriptors where the GPU has TMA (compute capability 9+), by
# direction; the others keep pointer loads (not measured with descriptors). H100, bf16, 32 query / 8 KV heads, 32k
# tokens, inputs strided as Transformers makes them (python -m benchmarks.experiments.tma_loads,
# benchmarks/results/tma_loads.jsonl): forward 3-10% faster at head sizes 64 and 128 for dense, block and token
# patterns; forward + backward 6-8% faster at 128, while at 64 the token pattern's backward was slower (forward +
# backward 55.1 against 53.4 ms).
TMA_HEAD_DIMS = {"forward": (64, 128), "backward": (128,)}


def triton_available(device=None) -> bool:
    """Triton importable, and either a CUDA device or the interpreter (``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    if INTERPRET:
        return True
    return device is None or torch.device(device).type == "cuda"


def unsupported_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str | None:
    """Why the kernels cannot take these inputs (``None`` when they can)."""
    if not triton_available(query.device):
        return f"Triton cannot run on {query.device.type} here" + (" (not installed)" if triton is None else "")
    if not interpreted(query.device):
        major, minor = gpu_capability(query.device)
        if major < 8:  # Triton supports compute capability 8.0+; bfloat16 does not even assemble below it
            return (f"the Triton kernels need a GPU of compute capability 8.0 or newer (Triton's supported hardware), "
                    f"and {query.device} has {major}.{minor}")
    if query.shape[-1] not in SUPPORTED_HEAD_DIMS or value.shape[-1] != query.shape[-1]:
        return (f"head size {query.shape[-1]} (value {value.shape[-1]}) is not one of "
                f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))} for query, key and value alike")
    if query.dtype not in SUPPORTED_DTYPES or not query.dtype == key.dtype == value.dtype:
        return f"dtypes {query.dtype}/{key.dtype}/{value.dtype}: one of float16, bfloat16, float32 for all three"
    if query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} KV heads"
    return None


@functools.lru_cache(maxsize=None)
def gpu_capability(device: torch.device) -> tuple[int, int]:
    """``torch.cuda.get_device_capability`` of ``device``, read once (every attention call asks)."""
    return torch.cuda.get_device_capability(device)


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Shapes, dtypes and device the kernels handle."""
    return unsupported_reason(query, key, value) is None


_COMPILED: dict = {}  # (kernel, launch options, argument specialisation) -> Triton's compiled kernel


def _signature(args: tuple) -> tuple:
    """What Triton specialises a launch on: each tensor's dtype and 16-byte alignment, whether each integer needs 64
    bits (every integer argument of our kernels is ``do_not_specialize``), any other argument's type; and the device of
    the first tensor. One expression, no call per argument: this runs in every decoding layer."""
    tensor = torch.Tensor
    return (args[0].device.index,) + tuple(
        (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, tensor)
        else -2**31 <= a < 2**31 if type(a) is int else type(a) for a in args)


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, fast_key: tuple | None = None, **options) -> None:
    """``kernel[grid](*args, **constexprs, **options)``; once a specialisation has been launched that way, later
    launches go through Triton's compiled kernel directly, skipping the per-call binding of arguments in
    ``JITFunction.run`` (on the H200 host the decode path's attention call went from 208-228 to 169-180 us per layer,
    ``benchmarks/decode_host.py``; the decode kernel's GPU time at batch 1 is a few microseconds).
    ``args`` are the kernel's non-constexpr parameters in order; its constexpr parameters come last, in ``constexprs``.
    Every integer parameter of the kernel must be ``do_not_specialize`` (the cache key does not track 1 or 16).

    ``fast_key``: a cheaper cache key the caller computed, which must determine everything the full key holds (the
    kernel, its constexprs and options, and every argument's specialisation); a hot call site (each decoding layer)
    passes one to skip :func:`_signature`."""
    grid = tuple(grid) + (1,) * (3 - len(grid))
    if fast_key is not None:
        compiled = _COMPILED.get(fast_key)
        if compiled is not None:
            compiled[grid](*args, *constexprs.values())
            return
    if interpreted(args[0].device):
        kernel[grid](*args, **constexprs, **options)
        return
    key = (kernel, tuple(sorted(options.items())), tuple(constexprs.items()), _signature(args))
    compiled = _COMPILED.get(key)
    if compiled is not None:
        if fast_key is not None:
            _COMPILED[fast_key] = compiled
        compiled[grid](*args, *constexprs.values())
        return
    names = list(getattr(kernel, "arg_names", []))
    if names[len(args):] != list(constexprs):  # the cached path passes them by position
        raise ValueError(f"launch({names and kernel.__name__}): constexprs {list(constexprs)} must be the kernel's "
                         f"parameters after the {len(args)} positional ones, in order: {names[len(args):]}")
    compiled = kernel[grid](*args, **constexprs, **options)
    if hasattr(compiled, "__getitem__"):  # a Triton without it keeps launching through the JIT function
        _COMPILED[key] = compiled
        if fast_key is not None:
            _COMPILED[fast_key] = compiled


_FITTED: dict = {}  # (site, device index, measured configuration, specialisation) -> the configuration that fit


def smaller_config(config: tuple, block_dims: tuple) -> tuple | None:
    """The next launch configuration to try when ``config`` (its last entry the pipeline stages, its entries at
    ``block_dims`` tile sizes) needs more shared memory than the GPU has: one stage fewer down to 2, then the largest
    tile size halved down to 16, then 1 stage; ``None`` when nothing is left to take away."""
    stages = config[-1]
    if stages > 2:
        return config[:-1] + (stages - 1,)
    sizes = [(config[i], i) for i in block_dims if config[i] > 16]
    if sizes:
        size, i = max(sizes)
        return config[:i] + (size // 2,) + config[i + 1:]
    return config[:-1] + (1,) if stages > 1 else None


def run_fitting(site: str, config: tuple, block_dims: tuple, run, device, spec: tuple = ()):
    """``run(config)``, or, where the GPU cannot hold that launch (Triton's ``OutOfResources``: shared memory, before
    anything runs), ``run`` with the first of :func:`smaller_config`'s configurations that it can. The launch tables
    were measured on H100 and H200 (227 KB of shared memory per program); an A100 has 163 KB, consumer Ampere and Ada
    GPUs 99 KB. The configuration that fit is remembered per call site, device, measured configuration and ``spec``
    (what else sets the kernel's needs, e.g. head size and dtype), so later calls start there, and a warning names
    it once."""
    key = (site, device.index, config, spec)
    chosen = _FITTED.get(key, config)
    while True:
        try:
            result = run(chosen)
        except OutOfResources as error:
            smaller = smaller_config(chosen, block_dims)
            if smaller is None:
                raise
            chosen = smaller
            failure = error
            continue
        if chosen != config and _FITTED.get(key) != chosen:
            _FITTED[key] = chosen
            warnings.warn(f"ppa_hf: the {site} kernel's launch configuration {config} does not fit this GPU "
                          f"({failure}); using {chosen}, which may be slower", stacklevel=2)
        return result


def tma_wanted(device, head_dim: int, direction: str) -> bool:
    """Whether the prefill kernels of ``direction`` (``"forward"`` or ``"backward"``) read their streamed tiles
    through tensor descriptors (Hopper's TMA copy engine): ``PPA_TRITON_TMA=1`` / ``0`` forces it on / off for both
    (``1`` also under the interpreter, for tests); by default on NVIDIA GPUs of compute capability 9 or more for
    the head sizes of :data:`TMA_HEAD_DIMS` (measured faster; :func:`tma_ready` still checks each tensor)."""
    flag = os.environ.get("PPA_TRITON_TMA", "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"PPA_TRITON_TMA={flag!r}: use 1 (tensor-descriptor loads), 0 (pointer loads) or leave it "
                         "unset")
    if TensorDescriptor is None:
        return False
    if flag or interpreted(device):
        return flag == "1"
    # (on ROCm, torch reports AMD architectures as capabilities, 9.x included: not Hopper)
    return head_dim in TMA_HEAD_DIMS[direction] and torch.version.hip is None and gpu_capability(device)[0] >= 9


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Every tensor can back a descriptor: 16-byte aligned base and strides (the last stride 1)."""
    for x in tensors:
        size = x.element_size()
        if x.data_ptr() % 16 or x.stride(-1) != 1 or any((st * size) % 16 for st in x.stride()[:-1]):
            return False
    return True


def descriptor(x: torch.Tensor, rows: int):
    """A tensor descriptor of ``x [B, heads, N, D]`` that loads ``rows`` rows of one head at a time."""
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, x.shape[-1]])


def dot_precision(dtype: torch.dtype) -> str:
    """The kernels' ``tl.dot`` input precision for inputs of ``dtype``. float32: ``"ieee"`` (exact products, as
    float32 SDPA computes them), or ``"tf32"`` where the user allowed tf32 for float32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``, off by default); half precision: Triton's default (its inputs are
    exact on the tensor cores either way)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def last_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a unit stride in its last dimension (the kernels index rows by stride, elements by one)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def interpreted(device) -> bool:
    """Kernels on ``device`` run under Triton's interpreter (a CPU device, or ``TRITON_INTERPRET=1``)."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return kind != "cuda" or INTERPRET


def env_config(name, default):
    """A ``"BM,BN,warps,stages"`` override from the environment (tuning), else ``default``."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return tuple(int(x) for x in raw.split(","))
    except ValueError:
        raise ValueError(f"{name}={raw!r}: a launch configuration is four comma-separated integers, e.g. "
                         "'128,64,4,3'") from None


# ----------------------------------------------------------------------------------------------------------------------
# The pattern's tables on the device (int8 for the kernels), and word tables: 64 table entries per load
# ----------------------------------------------------------------------------------------------------------------------
_TABLES = BoundedCache("triton tables", 64)


def pattern_tables(pattern: PPAPattern, length: int, device):
    """``(token_table, block_table)`` as int8 device tensors for positions below ``length`` (a block table of one
    ``True`` at token granularity, where the kernels never read it). Kept per table size, a power of two: the steps
    of a decoding run, one length each, share them (a key per length made two casts per step and pushed other
    entries out of the cache)."""
    tok, blk = pattern.tables(length + 1, device)

    def build():
        block = blk if blk is not None else torch.ones(1, dtype=torch.bool, device=device)
        return tok.to(torch.int8).contiguous(), block.to(torch.int8).contiguous()

    return _TABLES.get(("tables", pattern, tok.numel(), None if blk is None else blk.numel(), str(device)), build)


WORD_OFFSET = 256  # word tables start at offset -WORD_OFFSET (partial tiles reach d >= -(BM + BN))


def word_tables(pattern: PPAPattern, tok: torch.Tensor):
    """Two int64 tables that turn the token offset table into 64-bit row masks (one load per tile row instead of
    one per element): ``fwd[x + OFF]`` has bit ``c`` = ``tok[x - c]`` (rows = queries, columns = keys: a row's
    column ``c`` has offset ``x - c``), ``bwd[x + OFF]`` has bit ``c`` = ``tok[x + c]`` (rows = keys, columns =
    queries). Offsets outside ``[0, len(tok))`` read as not attended."""

    def build():
        t = tok.cpu().numpy().astype(bool)
        n = t.size
        padded = np.zeros(n + 2 * WORD_OFFSET + 128, dtype=np.uint64)
        padded[WORD_OFFSET + 64: WORD_OFFSET + 64 + n] = t  # padded[i] = tok[i - OFF - 64]
        size = n + WORD_OFFSET + 64
        x = np.arange(size) - WORD_OFFSET  # x + OFF = table index
        fwd = np.zeros(size, dtype=np.uint64)
        bwd = np.zeros(size, dtype=np.uint64)
        for c in range(64):
            fwd |= padded[x - c + WORD_OFFSET + 64] << np.uint64(c)
            bwd |= padded[np.minimum(x + c + WORD_OFFSET + 64, padded.size - 1)] << np.uint64(c)
        to = lambda a: torch.from_numpy(a.view(np.int64)).to(tok.device)  # noqa: E731
        return to(fwd), to(bwd)

    return _TABLES.get(("words", pattern, tok.numel(), str(tok.device)), build)


word_mask = tile_mask = table_hit = None  # the jit functions below, where Triton is installed

if triton is not None:

    @triton.jit
    def table_hit(TABLE, x, n):
        """``TABLE[x] != 0`` for an int8 pattern table of ``n`` entries, elementwise over ``x`` (any shape), ``x``
        clamped into ``[0, n)``."""
        return tl.load(TABLE + tl.minimum(tl.maximum(x, 0), n - 1)) != 0

    @triton.jit
    def word_mask(WORDS, n_words, x, ncols: tl.constexpr):
        """``[len(x), ncols]`` bool: bit ``c`` of ``WORDS[x + OFF]`` (``ncols <= 64``): one 8-byte load per row, then
        per element a shift that moves bit ``c`` into the sign bit and a sign test."""
        w = tl.load(WORDS + tl.minimum(tl.maximum(x + 256, 0), n_words - 1))
        c = tl.arange(0, ncols).to(tl.int64)
        return (w[:, None] << (63 - c)[None, :]) < 0

    @triton.jit
    def tile_mask(qpos, kpos, kv_end, TOK, tok_len, WORDS, n_words, BLK, blk_len, block_size, sinks, max_distance,
                  NCOLS: tl.constexpr, KEYS_ON_ROWS: tl.constexpr, GRAN_BLOCK: tl.constexpr,
                  HAS_SINKS: tl.constexpr, HAS_MD: tl.constexpr, USE_WORDS: tl.constexpr):
        """:meth:`PPAPattern.keep` of a tile, read from the pattern's tables: ``[len(qpos), len(kpos)]`` bool, or
        ``[len(kpos), len(qpos)]`` when ``KEYS_ON_ROWS``. The token part comes from the token table, one load per
        element, or (``USE_WORDS``, columns consecutive, ``NCOLS <= 64``) from the word table of that orientation,
        one load per row; the block part from the block table; sinks and a model's own window from scalars."""
        if KEYS_ON_ROWS:
            d = qpos[None, :] - kpos[:, None]
            kk = kpos[:, None]
            qq = qpos[None, :]
        else:
            d = qpos[:, None] - kpos[None, :]
            kk = kpos[None, :]
            qq = qpos[:, None]
        ok = (d >= 0) & (kk < kv_end)
        if USE_WORDS:
            if KEYS_ON_ROWS:
                hit = word_mask(WORDS, n_words, tl.min(qpos, 0) - kpos, NCOLS)
            else:
                hit = word_mask(WORDS, n_words, qpos - tl.min(kpos, 0), NCOLS)
        else:
            hit = table_hit(TOK, d, tok_len)
        if GRAN_BLOCK:
            hit = hit | table_hit(BLK, qq // block_size - kk // block_size, blk_len)
        if HAS_SINKS:
            hit = hit | (kk < sinks)
        if HAS_MD:
            ok = ok & (d < max_distance)
        return ok & hit
