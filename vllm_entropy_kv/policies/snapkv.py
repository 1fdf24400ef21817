"""SnapKV: observation-window attention, pooled along the sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from vllm_entropy_kv.policies.base import LayerObservation
from vllm_entropy_kv.policies.registry import register_policy
from vllm_entropy_kv.policies.selection import LayerScores, ScorerPolicy
from vllm_entropy_kv.policies.stats import GroupReduce, aggregate_heads, attention_stats_batch


def pool_scores(head_scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """[..., n] -> [..., n]: 1-D max or average pooling along the sequence (stride 1, same
    length), so a kept token brings its neighbours and the cache keeps whole phrases (SnapKV)."""
    if kernel_size <= 1:
        return head_scores
    n = head_scores.shape[-1]
    x = head_scores.reshape(-1, 1, n)
    pad = kernel_size // 2
    if pooling == "max":
        pooled = F.max_pool1d(x, kernel_size, stride=1, padding=pad)
    elif pooling == "avg":
        pooled = F.avg_pool1d(x, kernel_size, stride=1, padding=pad, count_include_pad=False)
    else:
        raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
    return pooled[..., :n].reshape(head_scores.shape)


@register_policy
@dataclass
class SnapKVPolicy(ScorerPolicy):
    """SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before
    Generation"): the last `observation_queries` prompt queries vote for keys; each head's
    votes are smoothed by 1-D pooling, then combined over heads (GQA-aware) into one token set
    per layer; uniform layer budgets. The window itself stays (`Budget.recent_tokens`).

    observation_queries: the observation window W.
    kernel_size: pooling width (SnapKV uses 5-7).
    pooling: "avg" or "max".
    group_reduce: how the query heads of one KV head combine ("mean", "max", "sum").
    """

    name: ClassVar[str] = "snapkv"
    observation_queries: int | None = 32
    kernel_size: int = 5
    pooling: Literal["avg", "max"] = "avg"
    group_reduce: GroupReduce = "mean"

    def score(self, layers: list[LayerObservation]) -> LayerScores:
        stats = attention_stats_batch(layers, self.observation_queries, entropy=False)
        pooled = pool_scores(stats.head_scores, self.kernel_size, self.pooling)
        return LayerScores(aggregate_heads(pooled, stats.num_kv_heads, self.group_reduce), stats)
