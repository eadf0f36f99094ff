"""Where a training step's GPU time goes: torch.profiler tables (CUDA time per kernel) of one training step of the
1B-shaped model of benchmarks/run.py (gradient checkpointing, batch 1), sdpa as Transformers runs it against PPA
p = 0.75. Needs a CUDA GPU.

    python benchmarks/profile_train.py [--runs L:LAYERS:GRANULARITY ...] [--compiled L:LAYERS]

``--runs`` (default ``131072:4:block 32768:8:token``): eager steps, sdpa then PPA; prints each table and writes
``$OUT/train_profile_<L>_<impl>_<granularity>.txt``. ``--compiled``: also the ``torch.compile``'d sdpa step (no
gradient checkpointing, as ``run.py train --compiled`` times it) next to the eager one without checkpointing: which
attention kernels each runs and their time, and whether Transformers handed SDPA an explicit mask under compile
(``$OUT/train_profile_compiled_<L>.txt``).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.run import ATTENTION_KERNELS, VOCAB, make_model, use_impl  # noqa: E402

OUT = os.environ.get("OUT", ".")


def profile_step(step):
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return prof


def attention_kernels(prof) -> list[tuple[str, float, int]]:
    """``(kernel name, total CUDA ms, calls)`` of the attention kernels in a profile, longest first."""
    rows = [(e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages()
            if e.device_time_total > 0 and any(s in e.key.lower() for s in ATTENTION_KERNELS)]
    return sorted(rows, key=lambda r: -r[1])


def eager_runs(runs):
    for L, layers, gran in runs:
        model = make_model("llama-1b", layers, L)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
        ids = torch.randint(0, VOCAB, (1, L), device="cuda")
        for impl in ("sdpa", "ppa"):
            use_impl(model, impl, gran, 0.75)

            def step():
                model(ids, labels=ids, use_cache=False).loss.backward()
                model.zero_grad(set_to_none=True)

            prof = profile_step(step)
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
            total = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
            head = f"== train L={L} layers={layers} {impl} {gran}: GPU kernel time {total:.1f} ms"
            print(head + "\n" + table, flush=True)
            name = f"train_profile_{L}_{impl}" + ("" if impl == "sdpa" else f"_{gran}") + ".txt"
            with open(os.path.join(OUT, name), "w") as handle:
                handle.write(head + "\n" + table)
        del model
        torch.cuda.empty_cache()


def compiled_run(L, layers):
    """The sdpa training step compiled and eager (both without gradient checkpointing): attention kernels and times,
    and the SDPA call's mask argument as Dynamo captured it."""
    import transformers

    seen = []

    def backend(gm, example_inputs):  # records how the graph calls SDPA, then runs inductor on it
        from torch._inductor.compile_fx import compile_fx

        for node in gm.graph.nodes:
            if "scaled_dot_product" in str(node.target):
                mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
                seen.append(f"{node.target}: attn_mask={'None' if mask is None else 'a tensor'}, "
                            f"is_causal={node.kwargs.get('is_causal')}")
        return compile_fx(gm, example_inputs)

    lines = [f"transformers {transformers.__version__}, torch {torch.__version__}, L={L}, layers={layers}"]
    ids = torch.randint(0, VOCAB, (1, L), device="cuda")
    for compiled in (False, True):
        model = make_model("llama-1b", layers, L)
        use_impl(model, "sdpa", None, None)
        model.train()
        fn = torch.compile(model, backend=backend) if compiled else model

        def step():
            fn(ids, labels=ids, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)

        step()  # compiles
        prof = profile_step(step)
        total = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
        lines.append(f"== sdpa {'compiled' if compiled else 'eager'} (no checkpointing): GPU kernel time {total:.1f} ms")
        lines += [f"   {ms:9.2f} ms  {calls:4d} calls  {name[:140]}" for name, ms, calls in attention_kernels(prof)]
        del model, fn
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    lines.append("SDPA calls in the compiled graphs: " + ("; ".join(sorted(set(seen))) or "none captured"))
    text = "\n".join(lines)
    print(text, flush=True)
    with open(os.path.join(OUT, f"train_profile_compiled_{L}.txt"), "w") as handle:
        handle.write(text + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=["131072:4:block", "32768:8:token"],
                    help="eager steps to profile, L:LAYERS:GRANULARITY each")
    ap.add_argument("--compiled", default=None, help="also the compiled sdpa step, L:LAYERS")
    args = ap.parse_args(argv)
    runs = []
    for spec in args.runs:
        L, layers, gran = spec.split(":")
        if gran not in ("token", "block"):
            raise ValueError(f"--runs entry {spec!r}: granularity must be token or block")
        runs.append((int(L), int(layers), gran))
    eager_runs(runs)
    if args.compiled:
        L, layers = (int(x) for x in args.compiled.split(":"))
        compiled_run(L, layers)


if __name__ == "__main__":
    main()
