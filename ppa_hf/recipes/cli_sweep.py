"""``ppa-hf sweep``: one task over a list of p values (optionally a short fine-tune per p); CSV + S-curve PNG.
Under ``accelerate launch`` each point's problems or windows are shared out over the processes (the model is
loaded once per process); fine-tuning sweeps run in one process."""

from __future__ import annotations


def add_parser(sub):
    from .cli_eval import add_eval_arguments

    parser = sub.add_parser("sweep", help="evaluate (and optionally fine-tune) over a list of p; CSV and plot")
    parser.add_argument("--ps", nargs="+", required=True, help="values of p in [0, 1] (e.g. 0 0.5 0.75 1)")
    add_eval_arguments(parser, with_p=False, with_output=False)
    parser.add_argument("--out-dir", required=True, help="folder for sweep.csv, sweep.png and per-p outputs")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="fine-tune this many steps at each p before evaluating (0 = evaluate only)")
    parser.add_argument("--train-file", default=None, help="fine-tune data (local JSONL)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lora-r", type=int, default=0)
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args) -> int:
    from .sharding import is_main_process
    from .sweep import run_sweep

    result = run_sweep(args)
    if is_main_process():  # under `accelerate launch` only the main process writes and reports
        print(f"wrote {result['csv']}\nwrote {result['png']}")
    return 0
