"""One generated prompt, its references, its score, and fitting a prompt to a token length."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Text -> number of tokens of the rendered prompt.
CountTokens = Callable[["Sample"], int]


@dataclass(frozen=True)
class Sample:
    """A user message, the start of the assistant's answer (RULER's answer prefix), the strings
    a correct answer contains, and how many tokens an answer may take."""

    task: str
    message: str
    answer_prefix: str
    references: tuple[str, ...]
    max_new_tokens: int

    def score(self, answer: str) -> float:
        """RULER's string_match_all: the fraction of references found in the answer
        (case-insensitive)."""
        text = answer.lower()
        return sum(r.lower() in text for r in self.references) / len(self.references)


def fit(build: Callable[[int], Sample], target: int, count: CountTokens, most: int) -> Sample:
    """The largest `build(size)`, size in [1, most], whose prompt has at most `target` tokens
    (binary search: prompt length grows with size, as RULER sizes its haystacks)."""
    lo, hi = 1, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(build(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    return build(lo)
