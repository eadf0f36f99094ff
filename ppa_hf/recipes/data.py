"""Math data through ``datasets``: GSM8K and MATH records as prompt/answer pairs, tokenized for SFT with the
loss on the answer only, and the few-shot prompts of the evaluation.

Record kinds (detected from the fields of the first record):

* ``gsm8k``: ``question``, ``answer`` (worked solution ending in ``#### N``);
* ``math``: ``problem`` and ``solution`` (MATH / MATH-500; ``answer`` optional, else the last ``\\boxed{}``).

Prompt formats (the ones lm-evaluation-harness uses for its stock tasks): ``Question: ...\\nAnswer:`` for
GSM8K and ``Problem:\\n...\\n\\nSolution:`` for MATH.
"""

from __future__ import annotations

import json
import os

def default_data_dir() -> str | None:
    """The offline data folder: ``$PPA_HF_DATA_DIR``, else ``../shared/data`` beside the checkout this package runs
    from (holding ``gsm8k/{train,test}.jsonl`` and ``math500/test.jsonl``), else ``None`` (use the Hub)."""
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))))), "shared", "data")
    for folder in (os.environ.get("PPA_HF_DATA_DIR"), beside):
        if folder and os.path.isdir(folder):
            return folder
    return None


KINDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}
HUB_DATASETS = {"gsm8k": ("openai/gsm8k", "main"), "math": ("HuggingFaceH4/MATH-500", None)}

# Four MATH exemplars for the 4-shot prompt (written for this project, in the Minerva answer format).
MATH_FEWSHOT = [
    {"problem": "What is the smallest positive integer $n$ such that $3n$ leaves a remainder of 2 when "
                "divided by 7?",
     "solution": "We need $3n \\equiv 2 \\pmod 7$. Trying $n = 1, 2, 3$ gives $3n = 3, 6, 9$, and $9 = 7 + 2$. "
                 "So $n = \\boxed{3}$.\nFinal Answer: The final answer is $3$. I hope it is correct."},
    {"problem": "Simplify $\\dfrac{12}{18} + \\dfrac{1}{6}$.",
     "solution": "First $\\frac{12}{18} = \\frac{2}{3} = \\frac{4}{6}$. Adding $\\frac{1}{6}$ gives "
                 "$\\frac{5}{6}$, so the answer is $\\boxed{\\frac{5}{6}}$.\nFinal Answer: The final answer is "
                 "$\\frac{5}{6}$. I hope it is correct."},
    {"problem": "The two legs of a right triangle have lengths 6 and 8. What is the length of the hypotenuse?",
     "solution": "By the Pythagorean theorem the hypotenuse is $\\sqrt{6^2 + 8^2} = \\sqrt{100} = 10$. "
                 "The answer is $\\boxed{10}$.\nFinal Answer: The final answer is $10$. I hope it is correct."},
    {"problem": "For which values of $x$ is $x^2 - 5x + 6 < 0$? Give your answer in interval notation.",
     "solution": "Factor: $x^2 - 5x + 6 = (x-2)(x-3)$, which is negative exactly between its roots. So the "
                 "solution set is $\\boxed{(2,3)}$.\nFinal Answer: The final answer is $(2,3)$. I hope it is "
                 "correct."},
]


def detect_kind(record: dict, source: str = "data") -> str:
    """``"gsm8k"`` or ``"math"`` from a record's fields; ``ValueError`` naming the fields otherwise."""
    for kind, fields in KINDS.items():
        if all(isinstance(record.get(f), str) for f in fields):
            return kind
    raise ValueError(
        f"{source}: records have fields {sorted(record)}; expected GSM8K records (question, answer) "
        f"or MATH records (problem, solution)"
    )


def load_records(path: str | None, kind: str | None = None, split: str = "train", limit: int | None = None,
                 name: str = "--train-file") -> tuple[list[dict], str]:
    """``(records, kind)`` from a local JSONL/JSON file (or the Hub ``split`` of ``kind`` when ``path`` is None).

    Every record is checked for the fields of its kind; errors name the file and the line.
    """
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # errors must stay one line; loading a local file needs no bar
    try:
        return _load_records(datasets, path, kind, split, limit, name)
    finally:
        if bars:
            datasets.enable_progress_bars()


def _load_records(datasets, path, kind, split, limit, name):
    if path is None:
        kind = kind or "gsm8k"
        hub, config = HUB_DATASETS[kind]
        dataset = datasets.load_dataset(hub, config, split=split)
        source = f"{hub} ({split})"
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}={path!r}: file does not exist (a local JSONL file is expected)")
        try:
            dataset = datasets.load_dataset("json", data_files=path, split="train")
        except Exception as err:  # datasets wraps JSON errors in several types
            raise ValueError(f"{name}={path!r}: not a readable JSON/JSONL file ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200]})") from None
        source = f"{name}={path!r}"
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    records = [dict(r) for r in dataset]
    if not records:
        raise ValueError(f"{source}: no records")
    found = detect_kind(records[0], source)
    if kind is not None and kind != found:
        raise ValueError(f"{source}: records look like {found} records, but {kind} records were expected "
                         f"(fields {', '.join(KINDS[kind])})")
    for i, record in enumerate(records):
        missing = [f for f in KINDS[found] if not isinstance(record.get(f), str)]
        if missing:
            raise ValueError(f"{source}: record {i + 1} lacks the text field(s) {missing} of a {found} record")
    return records, found


def prompt_of(record: dict, kind: str) -> str:
    if kind == "gsm8k":
        return f"Question: {record['question'].strip()}\nAnswer:"
    return f"Problem:\n{record['problem'].strip()}\n\nSolution:"


def target_of(record: dict, kind: str) -> str:
    if kind == "gsm8k":
        return " " + record["answer"].strip()
    return " " + record["solution"].strip()


def to_pairs(records: list[dict], kind: str) -> list[dict]:
    """``[{"prompt", "answer"}]`` pairs of SFT examples."""
    return [{"prompt": prompt_of(r, kind), "answer": target_of(r, kind)} for r in records]


def fewshot_prefix(kind: str, exemplars: list[dict]) -> str:
    """The few-shot block put before each test prompt (exemplars separated by a blank line)."""
    return "".join(prompt_of(r, kind) + target_of(r, kind) + "\n\n" for r in exemplars)


def math_exemplars(shots: int) -> list[dict]:
    if shots > len(MATH_FEWSHOT):
        raise ValueError(f"--shots={shots}: MATH has {len(MATH_FEWSHOT)} fixed exemplars; --shots must be 0..4")
    return MATH_FEWSHOT[:shots]


def tokenize_pairs(pairs: list[dict], tokenizer, seq_len: int) -> list[dict]:
    """SFT features: ``input_ids`` = prompt + answer + EOS (cut to ``seq_len``), ``labels`` = -100 on the
    prompt (loss on the answer only). Pairs whose answer would be cut away entirely are dropped."""
    eos = tokenizer.eos_token_id
    features = []
    for pair in pairs:
        prompt = tokenizer(pair["prompt"], add_special_tokens=False).input_ids
        answer = tokenizer(pair["answer"], add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
        ids = (prompt + answer)[:seq_len]
        labels = ([-100] * len(prompt) + answer)[:seq_len]
        if all(label == -100 for label in labels[1:]):
            continue
        features.append({"input_ids": ids, "labels": labels})
    if not features:
        raise ValueError(f"--seq-len={seq_len} leaves no answer token in any example; raise --seq-len")
    return features


def collate(features: list[dict], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding is -100 in labels)."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, :n] = torch.tensor(f["input_ids"])
        labels[row, :n] = torch.tensor(f["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
