"""Aggregation tasks (RULER's cwe and fwe): which words occur most often in a long list."""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from vllm_entropy_kv.eval.ruler.haystack import essay_words
from vllm_entropy_kv.eval.ruler.sample import Sample

COMMON_WORDS = 10
UNCOMMON_REPEATS = 3
TOKENS_PER_WORD = 5
CODED_VOCABULARY = 200
# Zipf exponent of the coded words (RULER's alpha); rank 0 is the "...." noise word.
ZIPF_ALPHA = 2.0
FREQUENT_WORDS = 3


def draw_common(task: str, rng: random.Random) -> Callable[[int], Sample]:
    """Common-word extraction: a numbered list where 10 words recur often and the others
    `UNCOMMON_REPEATS` times; sized by the number of uncommon words."""
    words = rng.sample(essay_words(), 1000)
    common = words[:COMMON_WORDS]
    seed = rng.random()

    def build(uncommon: int) -> Sample:
        # Common words stay several times as frequent as the others at every size.
        repeats = max(UNCOMMON_REPEATS + 2, min(30, uncommon // 3))
        entries = common * repeats + words[COMMON_WORDS : COMMON_WORDS + uncommon] * (
            UNCOMMON_REPEATS
        )
        random.Random(seed).shuffle(entries)
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
        return Sample(
            task=task,
            message="Below is a numbered list of words. In these words, some appear more often "
            "than others. Memorize the ones that appear most often.\n"
            f"{listing}\nQuestion: What are the {COMMON_WORDS} most common words in the above "
            "list?",
            answer_prefix=f"Answer: The top {COMMON_WORDS} words that appear most often in the "
            "list are:",
            references=tuple(common),
            max_new_tokens=TOKENS_PER_WORD * COMMON_WORDS,
        )

    return build


def draw_frequent(task: str, rng: random.Random) -> Callable[[int], Sample]:
    """Frequent-word extraction: coded words drawn with Zipf frequencies; the three most
    frequent after the "...." noise word are the answer; sized by the number of words."""
    vocabulary: list[str] = []
    while len(vocabulary) < CODED_VOCABULARY:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6)))
        if word not in vocabulary:
            vocabulary.append(word)
    vocabulary[0] = "...."
    weights = [1 / (rank + 1) ** ZIPF_ALPHA for rank in range(CODED_VOCABULARY)]
    seed = rng.random()

    def build(size: int) -> Sample:
        # Exact Zipf counts, so the top words are strictly ordered at every size.
        counts = [round(size * w / sum(weights)) for w in weights]
        text = [w for w, c in zip(vocabulary, counts) for _ in range(c)]
        random.Random(seed).shuffle(text)
        return Sample(
            task=task,
            message="Read the following coded text and track the frequency of each coded "
            "word. Find the three most frequently appeared coded words. "
            f"{' '.join(text)}\nQuestion: Do not provide any explanation. Please ignore the dots "
            "'....'. What are the three most frequently appeared words in the above coded text?",
            answer_prefix="Answer: According to the coded text above, the three most frequently "
            "appeared words are:",
            references=tuple(vocabulary[1 : 1 + FREQUENT_WORDS]),
            max_new_tokens=TOKENS_PER_WORD * FREQUENT_WORDS,
        )

    return build
