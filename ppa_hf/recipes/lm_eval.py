"""lm-evaluation-harness with PPA: the ``ppa-lm-eval`` command and the ``ppa`` model type.

    ppa-lm-eval run --model ppa --model_args pretrained=PATH,ppa_p=0.75,ppa_window=64 \
        --tasks ppa_gsm8k --batch_size 8 --limit 20
    ppa-lm-eval run --model ppa --model_args ppa_p=0.75 --tasks ppa_math500     # embedded SmolLM2

``ppa-lm-eval`` is lm-eval's own command line after ``import ppa_hf`` (which registers
``attn_implementation="ppa"``), with the ``ppa`` model registered and this package's task folder
(``ppa_hf/lm_eval_tasks``: GSM8K and MATH-500 on local JSONL files) added to ``--include_path``.
The data folder for those tasks: ``--metadata '{"data_dir": "../shared/data"}'``, or the environment variable
``PPA_HF_DATA_DIR``, else ``../shared/data`` beside the checkout.

Model arguments (besides every argument of lm-eval's ``hf`` model): ``ppa_p`` (required unless the model's
config has one), ``ppa_window``, ``ppa_sink_tokens``, ``ppa_granularity``, ``ppa_block_size``, ``ppa_backend``.
``pretrained`` defaults to the embedded SmolLM2-135M-Instruct (GGUF).
"""

from __future__ import annotations

import os
import sys

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
PPA_ARGS = ("ppa_p", "ppa_window", "ppa_sink_tokens", "ppa_granularity", "ppa_block_size", "ppa_backend")
_REGISTERED = False


def register_lm_eval_model() -> None:
    """Register the ``ppa`` model type with lm-eval (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import torch
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    import ppa_hf  # noqa: F401  (registers attn_implementation="ppa")
    from ..pattern import check_int, check_p

    @register_model("ppa", "ppa-hf")
    class PPALM(HFLM):
        """lm-eval's ``hf`` model loaded with ``attn_implementation="ppa"`` and the given ``ppa_*`` settings."""

        def __init__(self, pretrained=None, gguf_file=None, device=None, **kwargs):
            from ..models import default_gguf
            from .sharding import process_state

            # under a multi-process launch without GPUs, start accelerate's state for CPU processes (gloo) first:
            # lm-eval's own Accelerator() would find no GPU and leave each process on its own
            process_state()
            if pretrained in (None, "", "default", "smollm2"):
                pretrained, gguf_file = default_gguf()
            ppa = {k: kwargs.pop(k) for k in PPA_ARGS if kwargs.get(k) is not None}
            if "ppa_p" in ppa:
                ppa["ppa_p"] = check_p(ppa["ppa_p"], "ppa_p")
            if "ppa_window" in ppa:
                ppa["ppa_window"] = check_int(ppa["ppa_window"], "ppa_window", 1)
            if "ppa_sink_tokens" in ppa:
                ppa["ppa_sink_tokens"] = check_int(ppa["ppa_sink_tokens"], "ppa_sink_tokens", 0)
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            kwargs.setdefault("dtype", "float32" if device == "cpu" else "auto")
            super().__init__(pretrained=pretrained, gguf_file=gguf_file, device=device,
                             attn_implementation="ppa", **ppa, **kwargs)
            config = self.model.config
            if getattr(config, "ppa_p", None) is None:
                raise ValueError("ppa_p is not set: pass --model_args ...,ppa_p=0.75 (a value in [0, 1]) or "
                                 "evaluate a model whose saved config has ppa_p")
            if getattr(config, "_attn_implementation", None) != "ppa":
                raise RuntimeError(f"model loaded with attn_implementation={config._attn_implementation!r}, not 'ppa'")
            accelerator = getattr(self, "accelerator", None)
            if accelerator is not None and accelerator.num_processes > 1 and self.world_size == 1:
                # lm-eval turns on its data-parallel mode (requests split by rank, results gathered on rank 0)
                # only when it counts more than one GPU; a launch of CPU processes (gloo) gets it here, instead
                # of every process evaluating everything and writing the same files
                self._rank = accelerator.process_index
                self._world_size = accelerator.num_processes

    _REGISTERED = True


def _with_include_path(argv: list[str]) -> list[str]:
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        # lm-eval takes one --include_path; join ours to the user's with ':'
        out = []
        for i, a in enumerate(argv):
            if a.startswith("--include_path="):
                out.append(a + ":" + TASKS_DIR)
            elif i > 0 and argv[i - 1] == "--include_path":
                out.append(a + ":" + TASKS_DIR)
            else:
                out.append(a)
        return out
    if argv and argv[0] in ("validate",):
        return argv
    if argv and argv[0] == "ls" and len(argv) >= 2:
        return argv + ["--include_path", TASKS_DIR]
    if argv and argv[0] == "ls":
        return argv
    if len(argv) >= 1:
        return argv + ["--include_path", TASKS_DIR]
    return argv


def main(argv=None) -> int:
    """``ppa-lm-eval``: lm-eval's CLI with PPA available."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("ppa-lm-eval: error: lm-evaluation-harness is not installed; pip install 'ppa_hf[lm-eval]'",
              file=sys.stderr)
        return 2
    register_lm_eval_model()
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["ppa-lm-eval"] + _with_include_path(argv)
    try:
        cli_evaluate()
    except (ValueError, FileNotFoundError) as err:
        print(f"ppa-lm-eval: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
