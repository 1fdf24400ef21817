"""Needle in a haystack, RULER's four kinds: one key; several keys, one asked (the others are
distractors); one key with several values; several keys, all asked."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from vllm_entropy_kv.eval.ruler.haystack import (
    filler,
    filler_start,
    insert_at_depths,
    key_word,
    magic_number,
)
from vllm_entropy_kv.eval.ruler.sample import Sample

INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "it. I will quiz you about the numbers afterwards."
)
# Digits are one token each: 7 digits per value, plus room for separators.
TOKENS_PER_VALUE = 10


@dataclass(frozen=True)
class Needles:
    """How many needle keys, values per key, and asked keys one NIAH kind has."""

    keys: int = 1
    values: int = 1
    queries: int = 1

    def build(self, rng: random.Random, task: str) -> NeedleSet:
        taken: set[str] = set()
        keys = [key_word(rng, taken) for _ in range(self.keys)]
        values = {k: [magic_number(rng) for _ in range(self.values)] for k in keys}
        needles = [f"One of the special magic numbers for {k} is: {v}." for k in keys
                   for v in values[k]]
        rng.shuffle(needles)
        depths = [rng.random() for _ in needles]
        asked = rng.sample(keys, self.queries)
        return NeedleSet(task, self, needles, depths, asked, values, filler_start(rng))


@dataclass(frozen=True)
class NeedleSet:
    """One sample's needles and their places; `sample(sentences)` sizes the haystack."""

    task: str
    kind: Needles
    needles: list[str]
    depths: list[float]
    asked: list[str]
    values: dict[str, list[str]]
    start: int

    def sample(self, sentences: int) -> Sample:
        context = insert_at_depths(filler(self.start, sentences), self.needles, self.depths)
        query = ", ".join(self.asked[:-1]) + (" and " if len(self.asked) > 1 else "")
        query += self.asked[-1]
        several = self.kind.values > 1 or self.kind.queries > 1
        question = (
            f"What are all the special magic numbers for {query} mentioned in the provided text?"
            if several
            else f"What is the special magic number for {query} mentioned in the provided text?"
        )
        prefix = (
            f"The special magic numbers for {query} mentioned in the provided text are"
            if several
            else f"The special magic number for {query} mentioned in the provided text is"
        )
        refs = tuple(v for k in self.asked for v in self.values[k])
        return Sample(
            task=self.task,
            message=f"{INTRO}\n{context}\n{question}",
            answer_prefix=prefix,
            references=refs,
            max_new_tokens=TOKENS_PER_VALUE * len(refs),
        )


KINDS = {
    "niah_single": Needles(),
    "niah_multikey": Needles(keys=4),
    "niah_multivalue": Needles(values=4),
    "niah_multiquery": Needles(keys=4, queries=4),
}


def draw(task: str, rng: random.Random) -> Callable[[int], Sample]:
    """One NIAH sample of kind `task`, sized by its number of haystack sentences."""
    return KINDS[task].build(rng, task).sample
