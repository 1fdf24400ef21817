"""Filler text and the random values hidden in it."""

from __future__ import annotations

import random
import string
from functools import lru_cache

from vllm_entropy_kv import assets
from vllm_entropy_kv.eval.texts import essays_text


@lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """The Paul Graham essays (the standard needle haystack) as sentences, in order."""
    text = " ".join(essays_text().split())
    return tuple(s.strip() + "." for s in text.split(". ") if s.strip())


@lru_cache(maxsize=1)
def news_articles() -> tuple[str, ...]:
    """The Lee news corpus: 300 real news articles, one per line."""
    path = assets.texts_dir() / "wikipedia" / "lee_background.cor"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return tuple(" ".join(line.split()) for line in lines if line.strip())


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """Distinct lowercase words of 4-10 letters from the essays, in first-seen order."""
    words = (w.strip(string.punctuation).lower() for w in essays_text().split())
    return tuple(dict.fromkeys(w for w in words if w.isalpha() and 4 <= len(w) <= 10))


def filler(start: int, sentences: int) -> list[str]:
    """`sentences` consecutive essay sentences from sentence `start` on (wrapping around)."""
    pool = essay_sentences()
    return [pool[(start + i) % len(pool)] for i in range(sentences)]


def filler_start(rng: random.Random) -> int:
    return rng.randrange(len(essay_sentences()))


def insert_at_depths(haystack: list[str], items: list[str], depths: list[float]) -> str:
    """Put each item before the sentence at its relative depth of `haystack`."""
    out = list(haystack)
    placed = sorted(zip(depths, items), key=lambda p: p[0], reverse=True)
    for depth, item in placed:
        out.insert(round(depth * len(haystack)), item)
    return " ".join(out)


def magic_number(rng: random.Random) -> str:
    """A 7-digit value, as RULER's needles use."""
    return str(rng.randrange(1_000_000, 10_000_000))


def key_word(rng: random.Random, taken: set[str]) -> str:
    """A key none of `taken` uses: two essay words joined by a hyphen (RULER uses word keys)."""
    words = essay_words()
    while True:
        key = f"{rng.choice(words)}-{rng.choice(words)}"
        if key not in taken:
            taken.add(key)
            return key
