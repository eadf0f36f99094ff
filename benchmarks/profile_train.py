"""Where a training step's GPU time goes: torch.profiler tables (CUDA time per kernel) of one training step of the
1B-shaped model of benchmarks/run.py (gradient checkpointing, batch 1), sdpa as Transformers runs it against PPA
p = 0.75: block granularity at 128k (4 layers) and token granularity at 32k (8 layers). Needs a CUDA GPU.

    python benchmarks/profile_train.py    # prints the tables, writes $OUT/train_profile_<L>_<impl>.txt
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.run import VOCAB, make_model, use_impl  # noqa: E402

OUT = os.environ.get("OUT", ".")


def main():
    from torch.profiler import profile, ProfilerActivity
    for L, layers, gran in ((131072, 4, "block"), (32768, 8, "token")):
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
            step(); torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step(); torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            print(f"== train L={L} {impl} {gran}\n" + table, flush=True)
            open(os.path.join(OUT, f"train_profile_{L}_{impl}.txt"), "w").write(table)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
