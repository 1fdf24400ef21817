"""QA over a haystack of documents (RULER's qa, without SQuAD): real news articles, one of
which holds a sentence asked back with its number blanked out; the others are distractors."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from functools import lru_cache

from vllm_entropy_kv.eval.ruler.haystack import news_articles
from vllm_entropy_kv.eval.ruler.sample import Sample

INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words."
)
BLANK = "___"
ANSWER_TOKENS = 12
_NUMBER = re.compile(r"(?<![\w.,])\d[\d,]*\d(?![\w]|[.,]\d)")


@lru_cache(maxsize=1)
def questions() -> tuple[tuple[int, str, str], ...]:
    """(article, sentence with the number blanked, number) for every sentence of 8-40 words
    that holds exactly one number of two or more digits."""
    out = []
    for i, article in enumerate(news_articles()):
        for sentence in re.split(r"(?<=[.!?])\s+", article):
            numbers = _NUMBER.findall(sentence)
            if len(numbers) == 1 and 8 <= len(sentence.split()) <= 40:
                out.append((i, sentence.replace(numbers[0], BLANK, 1), numbers[0]))
    return tuple(out)


def draw(task: str, rng: random.Random) -> Callable[[int], Sample]:
    """One question; the haystack holds its article among distractor articles, at a random
    place; sized by the number of distractors."""
    article, sentence, number = rng.choice(questions())
    articles = news_articles()
    others = [i for i in range(len(articles)) if i != article]
    rng.shuffle(others)
    place = rng.random()

    def build(distractors: int) -> Sample:
        docs = others[:distractors]
        docs.insert(round(place * len(docs)), article)
        context = "\n\n".join(f"Document {k + 1}:\n{articles[d]}" for k, d in enumerate(docs))
        return Sample(
            task=task,
            message=f"{INSTRUCTION}\n\nThe following are given documents.\n\n{context}\n\n"
            f"{INSTRUCTION}\n\nQuestion: Which number is missing ({BLANK}) from this sentence "
            f'of the documents? "{sentence}"',
            answer_prefix="Answer:",
            references=(number,),
            max_new_tokens=ANSWER_TOKENS,
        )

    return build
