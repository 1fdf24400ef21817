"""StreamingLLM: attention sinks plus a window of the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_entropy_kv.policies.base import LayerObservation
from vllm_entropy_kv.policies.registry import register_policy
from vllm_entropy_kv.policies.selection import LayerScores, ScorerPolicy


@register_policy
@dataclass
class StreamingPolicy(ScorerPolicy):
    """StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
    Sinks"): keep the first `Budget.sink_tokens` tokens and fill the rest of each layer's
    (uniform) budget with the most recent ones. No parameters of its own; no attention needed.
    """

    name: ClassVar[str] = "streaming"
    observation_queries: ClassVar[int | None] = 0

    def score(self, layers: list[LayerObservation]) -> LayerScores:
        # Later is better: the score is the position itself.
        n, device = layers[0].num_tokens, layers[0].keys.device
        positions = torch.arange(n, dtype=torch.float32, device=device)
        return LayerScores(positions.expand(len(layers), n))
