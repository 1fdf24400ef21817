"""Variable tracking (RULER's vt): a chain of assignments hidden in the haystack,
`VAR A = 12345`, `VAR B = VAR A`, ...; the answer names every variable of the chain."""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from vllm_entropy_kv.eval.ruler.haystack import filler, filler_start, insert_at_depths
from vllm_entropy_kv.eval.ruler.sample import Sample

HOPS = 4
INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
TOKENS_PER_NAME = 6


def draw(task: str, rng: random.Random) -> Callable[[int], Sample]:
    """One chain of HOPS + 1 variables, placed in order at random depths."""
    names: list[str] = []
    while len(names) < HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}."]
    chain += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted(rng.random() for _ in chain)
    start = filler_start(rng)

    def build(sentences: int) -> Sample:
        context = insert_at_depths(filler(start, sentences), chain, depths)
        return Sample(
            task=task,
            message=f"{INTRO}\n\n{context}\nQuestion: Find all variables that are assigned the "
            f"value {value} in the text above.",
            answer_prefix=f"Answer: According to the chain(s) of variable assignment in the "
            f"text above, {len(names)} variables are assigned the value {value}, they are:",
            references=tuple(names),
            max_new_tokens=TOKENS_PER_NAME * len(names),
        )

    return build
