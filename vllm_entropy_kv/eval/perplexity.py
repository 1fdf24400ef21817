"""Perplexity of a held-back continuation after a compressed context.

The context is prefilled and compressed once; the continuation then runs in one forward pass
over the compressed cache at its logical positions. Token i+1 of the continuation is scored
from position i, so every scored token depends on the compressed cache (the first
continuation token, predicted by the uncompressed prefill, is left out).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vllm_entropy_kv.eval.attention import LayerRecord
from vllm_entropy_kv.eval.cache import KVState
from vllm_entropy_kv.eval.model import Model
from vllm_entropy_kv.eval.ruler.stats import BOOTSTRAP_RESAMPLES, percentile_interval


@dataclass
class Scored:
    """Summed negative log-likelihood of `tokens` continuation tokens (+ recorded queries
    offline; a server-scored continuation has none)."""

    nll: float
    tokens: int
    records: dict[int, LayerRecord] = field(default_factory=dict)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(1, self.tokens))


def perplexity_ratio(
    scored: Sequence[Scored], base: Sequence[Scored], seed: int = 0
) -> tuple[float, float, float]:
    """The ratio of `scored`'s token-weighted perplexity to `base`'s over the same documents
    (paired, in the same order), with a 95% percentile-bootstrap interval that resamples
    whole documents: a document's tokens share one text, so they are not independent."""
    if len(scored) != len(base) or not base:
        raise ValueError(f"{len(scored)} scored documents against {len(base)} base ones")
    if any(s.tokens != b.tokens for s, b in zip(scored, base)):
        raise ValueError("paired documents must score the same number of tokens")
    pairs = [(s.nll - b.nll, b.tokens) for s, b in zip(scored, base)]

    def ratio(sample: Sequence[tuple[float, int]]) -> float:
        return math.exp(sum(d for d, _ in sample) / max(1, sum(t for _, t in sample)))

    rng = random.Random(seed)
    replicates = [ratio(rng.choices(pairs, k=len(pairs))) for _ in range(BOOTSTRAP_RESAMPLES)]
    return (ratio(pairs), *percentile_interval(replicates))


def score_continuation(
    model: Model,
    kv: KVState,
    continuation: torch.Tensor,
    *,
    use_bias: bool = True,
    record: slice | None = None,
) -> Scored:
    """NLL of continuation[1:] given the cache `kv` (which grows by the continuation)."""
    m = continuation.shape[1]
    step = model.forward(continuation, kv, record=record, use_bias=use_bias, logits=slice(0, m - 1))
    assert step.logits is not None
    nll = F.cross_entropy(step.logits[0], continuation[0, 1:], reduction="sum")
    return Scored(nll=float(nll), tokens=m - 1, records=step.records)
