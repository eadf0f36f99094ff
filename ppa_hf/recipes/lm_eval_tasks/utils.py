"""Local-data loaders and MATH scoring for the ppa_hf lm-eval tasks (no Hub access needed).

The data folder: task metadata ``data_dir`` (``--metadata '{"data_dir": "..."}'``), else the environment variable
``PPA_HF_DATA_DIR``, else ``../shared/data`` beside the ppa_hf checkout. It holds ``gsm8k/train.jsonl``,
``gsm8k/test.jsonl`` and ``math500/test.jsonl``.
"""

import os

import datasets


def data_dir(data_dir=None):
    from ppa_hf.recipes.data import default_data_dir

    for folder in (data_dir, default_data_dir()):
        if folder and os.path.isdir(folder):
            return folder
    raise FileNotFoundError(
        f"data_dir={data_dir!r}: no data folder found; pass --metadata '{{\"data_dir\": \"PATH\"}}' or set "
        "PPA_HF_DATA_DIR to a folder holding gsm8k/{train,test}.jsonl and math500/test.jsonl")


def _files(folder, names):
    files = {split: os.path.join(folder, rel) for split, rel in names.items()}
    for split, path in files.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{split} split {path!r} does not exist")
    return files


def load_gsm8k(data_dir=None, **_metadata):
    """GSM8K train (few-shot source) and test splits from local JSONL."""
    folder = globals()["data_dir"](data_dir)
    return datasets.load_dataset("json", data_files=_files(
        folder, {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}))


def load_math500(data_dir=None, **_metadata):
    """MATH-500 test split from local JSONL."""
    folder = globals()["data_dir"](data_dir)
    return datasets.load_dataset("json", data_files=_files(folder, {"test": "math500/test.jsonl"}))


def math_fewshot_samples():
    """The four fixed MATH exemplars of ``ppa-hf eval`` (Minerva answer format)."""
    from ppa_hf.recipes.data import MATH_FEWSHOT

    return [dict(r, few_shot="1") for r in MATH_FEWSHOT]


def math_doc_to_text(doc):
    return "Problem:\n" + doc["problem"] + "\n\nSolution:"


def math_process_results(doc, results):
    """exact_match: the generation's answer (last \\boxed{}, else "final answer is $X$") equals the gold answer
    after ppa_hf's normalisation (the same scoring as ``ppa-hf eval --task math500``)."""
    from ppa_hf.recipes.answers import extract_math, math_equal, math_gold

    return {"exact_match": int(math_equal(extract_math(results[0]), math_gold(doc)))}
