"""Top-k of the observation window's attention, no pooling: the plainest attention baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vllm_entropy_kv.policies.base import LayerObservation
from vllm_entropy_kv.policies.registry import register_policy
from vllm_entropy_kv.policies.selection import LayerScores, ScorerPolicy
from vllm_entropy_kv.policies.stats import GroupReduce, attention_stats_batch


@register_policy
@dataclass
class TopKPolicy(ScorerPolicy):
    """Keep the tokens the last `observation_queries` prompt queries attend to most, summed
    over queries and heads (GQA-aware), with uniform layer budgets. The Top-K baseline of the
    SRC article.

    observation_queries: window size W (the last W prompt queries score the keys).
    group_reduce: how the query heads of one KV head combine ("mean", "max", "sum").
    """

    name: ClassVar[str] = "topk"
    observation_queries: int | None = 32
    group_reduce: GroupReduce = "mean"

    def score(self, layers: list[LayerObservation]) -> LayerScores:
        stats = attention_stats_batch(layers, self.observation_queries, entropy=False)
        return LayerScores(stats.token_scores(self.group_reduce), stats)
