"""The suite's tasks by name, and one seeded sample of a task at a token length."""

from __future__ import annotations

import random
from collections.abc import Callable

from vllm_entropy_kv.eval.ruler import niah, qa, variables, words
from vllm_entropy_kv.eval.ruler.sample import CountTokens, Sample, fit

# A task's generator: the random draws of one sample -> the sample at a haystack size.
Draw = Callable[[str, random.Random], Callable[[int], Sample]]

TASKS: dict[str, Draw] = {
    **{name: niah.draw for name in niah.KINDS},
    "vt": variables.draw,
    "cwe": words.draw_common,
    "fwe": words.draw_frequent,
    "qa": qa.draw,
}


def make_sample(task: str, length: int, index: int, seed: int, count: CountTokens) -> Sample:
    """Sample `index` of `task` whose prompt is as long as fits in `length` tokens; the same
    (seed, task, length, index) gives the same prompt on every machine."""
    rng = random.Random(f"{seed}/{task}/{length}/{index}")
    return fit(TASKS[task](task, rng), length, count, most=length)
