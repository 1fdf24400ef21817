"""Uniform random eviction: the floor any scoring method has to beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_entropy_kv.policies.base import LayerObservation
from vllm_entropy_kv.policies.registry import register_policy
from vllm_entropy_kv.policies.selection import LayerScores, ScorerPolicy


@register_policy
@dataclass
class RandomPolicy(ScorerPolicy):
    """Keep sinks, recent tokens and a uniformly random subset (uniform layer budgets).

    seed: the draw for layer i uses seed + i, so plans are reproducible whatever the order
        layers are planned in.
    """

    name: ClassVar[str] = "random"
    observation_queries: ClassVar[int | None] = 0
    seed: int = 0

    def score(self, layers: list[LayerObservation]) -> LayerScores:
        # Drawn on the host (one CPU generator per layer), moved in one copy.
        scores = torch.stack([
            torch.rand(obs.num_tokens, generator=torch.Generator().manual_seed(self.seed + i))
            for i, obs in enumerate(layers)
        ])
        return LayerScores(scores.to(layers[0].keys.device))
