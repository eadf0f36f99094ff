"""``ppa-hf eval``: GSM8K / MATH-500 accuracy (few-shot, greedy) or perplexity of one model at one p.

Under ``accelerate launch`` (or ``torchrun``) the problems or windows are shared out over the processes and
gathered back (:mod:`ppa_hf.recipes.sharding`); only the main process prints and writes."""

from __future__ import annotations

from .options import add_ppa_arguments, ppa_settings


def add_eval_arguments(parser, with_p: bool = True, with_output: bool = True):
    parser.add_argument("--model", default=None, help="model directory or Hub id (default: embedded SmolLM2-135M)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    # None = the model's saved value (else the plugin's default): a fine-tuned model evaluates as it was trained
    add_ppa_arguments(parser, omit=() if with_p else ("p",), keep_saved=True)
    parser.add_argument("--task", default="gsm8k", help="gsm8k | math500 | perplexity")
    parser.add_argument("--data", default=None,
                        help="local JSONL (gsm8k/math500) or text file / 'pydoc' / 'stdlib' (perplexity); "
                             "default: ../shared/data beside the checkout, else the Hub")
    parser.add_argument("--fewshot-data", default=None, help="GSM8K exemplars (default: train.jsonl beside --data)")
    parser.add_argument("--shots", type=int, default=4, help="few-shot exemplars (default 4, as the paper)")
    parser.add_argument("--limit", type=int, default=None, help="first N problems only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--strict", action="store_true", help="GSM8K: count only '#### N' / 'The answer is N'")
    parser.add_argument("--context", type=int, default=1024, help="perplexity: tokens per window")
    parser.add_argument("--stride", type=int, default=None, help="perplexity: window start every N tokens "
                                                                 "(default: --context, i.e. no overlap)")
    parser.add_argument("--max-windows", type=int, default=None, help="perplexity: at most N windows")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    if with_output:
        parser.add_argument("--output", default=None,
                            help="JSON summary path; per-sample rows go to <stem>.samples.jsonl beside it")


def add_parser(sub):
    parser = sub.add_parser("eval", help="evaluate on GSM8K, MATH-500 or perplexity")
    add_eval_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    import json

    from .evaluation import run_eval
    from .sharding import is_main_process

    summary = run_eval(task=args.task, model=args.model, gguf_file=args.gguf_file, data=args.data,
                       fewshot_data=args.fewshot_data, shots=args.shots, limit=args.limit, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, strict=args.strict, output=args.output,
                       context=args.context, stride=args.stride, max_windows=args.max_windows, dtype=args.dtype,
                       **ppa_settings(args))
    if not is_main_process():  # under `accelerate launch` every process has the summary; one prints it
        return 0
    keys = ["task", "ppa_p", "ppa_window", "ppa_sink_tokens", "ppa_granularity", "ppa_block_size"]
    keys += (["nll", "ppl", "tokens", "windows", "context", "stride"] if args.task == "perplexity"
             else ["accuracy", "correct", "total"] + [k for k in summary if k.startswith("accuracy_")])
    if summary["num_processes"] > 1:
        keys += ["num_processes", "windows_per_process" if args.task == "perplexity" else "problems_per_process"]
    print(json.dumps({k: summary[k] for k in keys + ["seconds"] if k in summary}))
    if args.output:
        print(f"wrote {args.output}" + (f" and {summary['samples_file']}" if "samples_file" in summary else ""))
    return 0
