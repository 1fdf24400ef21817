"""H2O: heavy hitters (accumulated attention) plus recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vllm_entropy_kv.policies.base import LayerObservation
from vllm_entropy_kv.policies.registry import register_policy
from vllm_entropy_kv.policies.selection import LayerScores, ScorerPolicy
from vllm_entropy_kv.policies.stats import GroupReduce, attention_stats_batch


@register_policy
@dataclass
class H2OPolicy(ScorerPolicy):
    """H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference
    of Large Language Models"): a key's score is the attention it accumulated over every
    observed prompt query; keep the heavy hitters plus the `Budget.recent_tokens` most recent
    tokens, uniform layer budgets, one token set per layer (GQA-aware).

    observation_queries: None (default) = every prompt query, as in H2O; the scores are then
        computed in query chunks, O(n^2 / 2) work per layer, so a cap (e.g. 1024) trades
        fidelity for speed. Earlier keys are seen by more queries, H2O's known recency bias.
    group_reduce: how the query heads of one KV head combine ("mean", "max", "sum").
    """

    name: ClassVar[str] = "h2o"
    observation_queries: int | None = None
    group_reduce: GroupReduce = "mean"

    def score(self, layers: list[LayerObservation]) -> LayerScores:
        stats = attention_stats_batch(layers, self.observation_queries, entropy=False)
        return LayerScores(stats.token_scores(self.group_reduce), stats)
