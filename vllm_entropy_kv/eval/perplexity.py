"""Perplexity of a held-back continuation after a compressed context.

The context is prefilled and compressed once; the continuation then runs in one forward pass
over the compressed cache at its logical positions. Token i+1 of the continuation is scored
from position i, so every scored token depends on the compressed cache (the first
continuation token, predicted by the uncompressed prefill, is left out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vllm_entropy_kv.eval.attention import LayerRecord
from vllm_entropy_kv.eval.cache import KVState
from vllm_entropy_kv.eval.model import Model


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
