"""Synthetic long-context retrieval tasks for the fine-tuned retrieval curve against p, built in token space from a
filler text, and the key budget of a pattern at the query that answers.

Every example is exactly ``context`` tokens: ``prompt + answer``; the loss (training) and the score (evaluation)
are on the answer tokens only. Examples are deterministic given a ``random.Random`` state, so a seed fixes a
training stream or an evaluation set (:func:`eval_set`).

* :class:`Passkey` (``passkey``): one 5-digit key, stated twice in one sentence at a random depth; asked for at
  the end (the task of docs/results.md section 2).
* :class:`MultiKey` (``multikey``): ``num_pairs`` sentences "The special magic number for NAME is VALUE." at
  random depths (distinct names, distinct 5-digit values); one name is asked for. The other pairs are
  distractors with the same wording, so the model has to bind the value to its name instead of copying the only
  number in sight; the asked pair is uniformly one of them, so its depth is uniform too (RULER's multi-key
  needle-in-a-haystack).
"""

from __future__ import annotations

import random

NAMES = (
    "apple", "anchor", "badger", "basil", "bishop", "bronze", "cactus", "canyon", "cobalt", "comet", "copper",
    "cricket", "dahlia", "delta", "dragon", "ember", "falcon", "fennel", "garnet", "glacier", "harbor", "hazel",
    "heron", "indigo", "island", "jaguar", "jasper", "kettle", "lantern", "lemon", "lotus", "maple", "marble",
    "meadow", "nectar", "nickel", "oasis", "olive", "onyx", "orchid", "otter", "pepper", "pigeon", "quartz",
    "quiver", "raven", "ribbon", "saffron", "salmon", "shadow", "sierra", "spruce", "thistle", "thunder", "tulip",
    "umber", "velvet", "violet", "walnut", "willow", "yarrow", "zephyr", "zinnia", "summit",
)


class RetrievalTask:
    """Base: ``sample(rng) -> dict`` with ``prompt`` (token ids), ``answer`` (token ids), ``answer_text``,
    ``depth`` (relative position of the asked fact in the filler, 0..1)."""

    name = "retrieval"

    def __init__(self, tokenizer, filler_ids, context: int):
        self.tok = tokenizer
        self.filler = [int(t) for t in (filler_ids.tolist() if hasattr(filler_ids, "tolist") else filler_ids)]
        self.context = int(context)

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def _fill(self, rng: random.Random, n_fill: int) -> list[int]:
        if n_fill < 0 or n_fill >= len(self.filler):
            raise ValueError(f"{self.name}: context {self.context} needs {n_fill} filler tokens; the filler has "
                             f"{len(self.filler)} (lower the context or give a longer filler)")
        start = rng.randrange(0, len(self.filler) - n_fill)
        return self.filler[start : start + n_fill]

    def sample(self, rng: random.Random) -> dict:
        raise NotImplementedError

    def batch(self, rng: random.Random, size: int):
        """``(input_ids [size, context], labels [size, context])`` long tensors; labels -100 except the answer."""
        import torch

        samples = [self.sample(rng) for _ in range(size)]
        ids = torch.tensor([s["prompt"] + s["answer"] for s in samples])
        labels = ids.clone()
        for row, s in enumerate(samples):
            labels[row, : len(s["prompt"])] = -100
        return ids, labels


class Passkey(RetrievalTask):
    name = "passkey"

    def __init__(self, tokenizer, filler_ids, context: int):
        super().__init__(tokenizer, filler_ids, context)
        self.question = self._ids(" What is the pass key? The pass key is")

    def sample(self, rng: random.Random) -> dict:
        key = f"{rng.randrange(10000, 100000)}"
        needle = self._ids(f" The pass key is {key}. Remember it. {key} is the pass key.")
        answer = self._ids(f" {key}")
        n_fill = self.context - len(needle) - len(self.question) - len(answer)
        fill = self._fill(rng, n_fill)
        depth = rng.randrange(0, n_fill + 1)
        prompt = fill[:depth] + needle + fill[depth:] + self.question
        return {"prompt": prompt, "answer": answer, "answer_text": key, "depth": depth / max(1, n_fill)}


class MultiKey(RetrievalTask):
    name = "multikey"

    def __init__(self, tokenizer, filler_ids, context: int, num_pairs: int = 8):
        super().__init__(tokenizer, filler_ids, context)
        if not 1 <= num_pairs <= len(NAMES):
            raise ValueError(f"num_pairs={num_pairs} must be in [1, {len(NAMES)}]")
        self.num_pairs = int(num_pairs)

    def sample(self, rng: random.Random) -> dict:
        names = rng.sample(NAMES, self.num_pairs)
        values = rng.sample(range(10000, 100000), self.num_pairs)
        asked = rng.randrange(self.num_pairs)
        needles = [self._ids(f" The special magic number for {n} is {v}.") for n, v in zip(names, values)]
        question = self._ids(f" What is the special magic number for {names[asked]}? "
                             f"The special magic number for {names[asked]} is")
        answer = self._ids(f" {values[asked]}")
        n_fill = self.context - sum(map(len, needles)) - len(question) - len(answer)
        fill = self._fill(rng, n_fill)
        cuts = sorted(rng.randrange(0, n_fill + 1) for _ in needles)  # needle k goes before filler token cuts[k]
        order = list(range(self.num_pairs))
        rng.shuffle(order)  # which needle sits at which cut
        prompt, prev = [], 0
        for cut, k in zip(cuts, order):
            prompt += fill[prev:cut] + needles[k]
            prev = cut
        prompt += fill[prev:] + question
        depth = cuts[order.index(asked)] / max(1, n_fill)
        return {"prompt": prompt, "answer": answer, "answer_text": str(values[asked]), "depth": depth,
                "asked": names[asked], "pairs": dict(zip(names, values))}


TASKS = {"passkey": Passkey, "multikey": MultiKey}


def make_task(name: str, tokenizer, filler_ids, context: int, **kwargs) -> RetrievalTask:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    return TASKS[name](tokenizer, filler_ids, context, **kwargs)


def train_rng(seed: int) -> random.Random:
    """The training stream of ``seed`` (the data order)."""
    return random.Random(1_000_003 * int(seed) + 11)


def eval_set(task: RetrievalTask, n: int, seed: int) -> list[dict]:
    """``n`` evaluation examples of ``seed`` (a different set for each seed; the same for every p and granularity
    at one seed, so two patterns can be compared prompt by prompt)."""
    rng = random.Random(1_000_003 * int(seed) + 7_919)
    return [task.sample(rng) for _ in range(int(n))]


def keys_at_query(position: int, p: float, window: int = 64, sink_tokens: int = 0, granularity: str = "token",
                  block_size: int = 128) -> int:
    """Keys attended by the query at 0-based ``position`` of one unpadded sequence (the query itself included)."""
    import torch

    from ..pattern import PPAPattern

    pattern = PPAPattern(p, window, sink_tokens, granularity, block_size)
    return int(pattern.keep(torch.tensor([int(position)]), torch.arange(int(position) + 1),
                            length=int(position) + 1).sum())
