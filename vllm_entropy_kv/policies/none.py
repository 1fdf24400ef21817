"""The full cache: keeps every prompt token in every layer (reference and `--kv-policy none`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vllm_entropy_kv.policies.base import Budget, KVPolicy, LayerObservation, LayerPlan
from vllm_entropy_kv.policies.registry import register_policy
from vllm_entropy_kv.policies.selection import keep_all
from vllm_entropy_kv.policies.stats import prompt_length


@register_policy
@dataclass
class NoCompression(KVPolicy):
    """Identity: every layer keeps all n tokens and the budget is ignored. No parameters."""

    name: ClassVar[str] = "none"
    observation_queries: ClassVar[int | None] = 0  # looks at no attention

    def plan(self, layers: list[LayerObservation], budget: Budget) -> list[LayerPlan]:
        n = prompt_length(layers)
        return [LayerPlan(keep=keep_all(n, obs.keys.device)) for obs in layers]
