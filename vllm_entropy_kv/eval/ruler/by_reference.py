"""Hits by the place of a reference in the question: for a task that asks for several values
in a set order (niah_multiquery names four keys in one question, and RULER's answer prefix
repeats them), how often each value is found, by where its key stands. It shows where along
the question a policy starts losing what the full cache finds: an observation window too
short to reach the first keys loses their needles.

The references are not stored in the rows; the samples are regenerated from each row's
(task, length, index, seed), which needs the tokenizer that fitted them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from vllm_entropy_kv.bench.sections import table
from vllm_entropy_kv.eval.results import Row
from vllm_entropy_kv.eval.ruler.sample import CountTokens
from vllm_entropy_kv.eval.ruler.tasks import make_sample

# Tasks whose references follow the order the question asks them in.
ORDERED_TASKS = ("niah_multiquery",)

Cell = tuple[str, float]  # (arm, ratio)


def hits_by_place(
    rows: Sequence[Row], count: CountTokens
) -> dict[tuple[str, int], dict[Cell, list[list[bool]]]]:
    """(task, length) -> (arm, ratio) -> one list per sample: whether each reference, in the
    question's order, is in the answer (case-insensitive, as `Sample.score`)."""
    out: dict[tuple[str, int], dict[Cell, list[list[bool]]]] = defaultdict(
        lambda: defaultdict(list))
    samples = {}
    for r in rows:
        if r["task"] not in ORDERED_TASKS:
            continue
        key = (r["task"], r["length"], r["index"], r["seed"])
        if key not in samples:
            samples[key] = make_sample(*key, count)
        answer = r["answer"].lower()
        found = [ref.lower() in answer for ref in samples[key].references]
        out[(r["task"], r["length"])][(r["arm"], r["ratio"])].append(found)
    return out


def by_place_tables(rows: Sequence[Row], count: CountTokens) -> list[str]:
    """Markdown: per ordered task and length, the share of samples finding each reference."""
    lines = []
    for (task, length), cells in sorted(hits_by_place(rows, count).items()):
        places = max(len(found) for per_sample in cells.values() for found in per_sample)
        header = ["policy", "ratio", "samples"] + [f"key {i + 1}" for i in range(places)]
        body = []
        for (arm, ratio), per_sample in sorted(cells.items(), key=lambda c: (-c[0][1], c[0][0])):
            shares = [sum(found[i] for found in per_sample) / len(per_sample)
                      for i in range(places)]
            body.append([arm, f"{ratio:g}", str(len(per_sample))]
                        + [f"{100 * s:.0f}%" for s in shares])
        lines += [f"{task} {length / 1024:g}k, values found by the place of their key in the "
                  "question (first named first):", "", table(header, body), ""]
    return lines
