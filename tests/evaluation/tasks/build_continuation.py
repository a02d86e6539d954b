"""Builds ``zeda_tiny_continuation.jsonl`` from the shipped corpus's held-out test split (run from the repo root):

    python tests/evaluation/tasks/build_continuation.py

Each item: a context of about 240 characters cut at a space inside one document, the true next ~48 characters,
and three distractors of the same length cut at spaces from other documents of the same domain. The model must give
the true continuation the highest log-likelihood (chance 25 %): a next-text task on the domains the tiny teacher was
trained on, with no download.
"""

from __future__ import annotations

import gzip
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
CONTEXT, CONT, PER_DOMAIN = 240, 48, 30


def _span_at_space(text: str, start: int, length: int) -> tuple[int, str] | None:
    """``(start, text[start:end])`` beginning at a space, about ``length`` long, ending before a space."""
    s = text.find(" ", start)
    if s < 0:
        return None
    e = text.find(" ", s + length)
    if e < 0:
        return None
    return s, text[s:e]


def build(corpus: str = "data/tiny_corpus/test.jsonl.gz", seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = [json.loads(line) for line in gzip.open(corpus, "rt")]
    items = []
    for domain in ("code", "prose", "math"):
        pool = [d["text"] for d in docs if d["domain"] == domain and len(d["text"]) > 3 * (CONTEXT + CONT)]
        rng.shuffle(pool)
        for i, text in enumerate(pool[:PER_DOMAIN]):
            cut = _span_at_space(text, rng.randrange(CONTEXT, len(text) - 2 * CONT), CONT)
            if cut is None:
                continue
            s, gold = cut
            context = text[max(0, s - CONTEXT) : s]
            distractors = []
            for other in rng.sample([t for j, t in enumerate(pool) if j != i], 8):
                span = _span_at_space(other, rng.randrange(0, len(other) - 2 * CONT), CONT)
                if span is not None and span[1] != gold and span[1] not in distractors:
                    distractors.append(span[1])
                if len(distractors) == 3:
                    break
            choices = [gold] + distractors
            rng.shuffle(choices)
            items.append({"domain": domain, "context": context, "choices": choices, "gold": choices.index(gold)})
    return items


if __name__ == "__main__":
    rows = build()
    with open(os.path.join(HERE, "zeda_tiny_continuation.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(len(rows), "items")
