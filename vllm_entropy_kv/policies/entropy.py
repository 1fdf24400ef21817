"""Entropy-guided layer budgets with one shared token set per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vllm_entropy_kv.policies.base import Budget, LayerObservation
from vllm_entropy_kv.policies.budgets import entropy_budgets
from vllm_entropy_kv.policies.registry import register_policy
from vllm_entropy_kv.policies.selection import (
    LayerScores,
    ScorerPolicy,
    carry_forward,
    chunk_scores,
)
from vllm_entropy_kv.policies.stats import (
    GroupReduce,
    HeadReduce,
    QueryReduce,
    attention_stats_batch,
)


@register_policy
@dataclass
class EntropyPolicy(ScorerPolicy):
    """Kim & Jung 2025, "Entropy-Guided KV Caching for Efficient LLM Inference" (Mathematics
    13(15) 2366). At the end of prefill each head's attention entropy (normalised to [0, 1])
    is averaged over the layer's heads; layers with broad attention (high entropy) get larger
    budgets, sink-like layers (low entropy) smaller ones, the total staying the global budget.
    Each layer keeps one token set for all its heads, chosen by attention summed over the
    observed queries and heads (GQA-aware).

    observation_queries: the window W of last prompt queries that measure entropy and scores;
        16, half of SnapKV's 32, so a question at the end of a prompt is not outvoted by the
        context's last tokens (offline, query-aware needle at 3k tokens and 25% kept: 4/5 with
        16 or 8, 3/5 with 32, 2/5 with 64; the full cache 4/5). The server plans with 32
        (`config.SERVED_WINDOWS`) and query_reduce "max" (`config.KVPolicyConfig`), which
        ranked first on the RULER-style suite's tuning and test splits (docs/RESULTS.md): 16
        misses the first of several keys a question names.
    exponent: budgets are proportional to entropy ** exponent (0 = uniform).
    min_fraction, max_fraction: per-layer clamps as fractions of the prompt length.
    group_reduce: how the query heads of one KV head combine ("mean", "max", "sum").
    head_reduce: how the KV heads combine into the layer's one token score: "mean" (the
        paper), or "max", AdaKV-style head-adaptive allocation within the shared token set
        (`aggregate_heads`).
    reach: a token scores at least as high as the attended tokens up to `reach - 1` positions
        before it (1: off), so a fact's continuation is kept with the key a question matched.
        With 32-token chunks a fact often straddles two chunks; the key's chunk was kept and
        the answer's dropped. Server-like offline needle (whole chat prompt compressed, 3k
        tokens, 9 depths, 25% kept): reach 32 6/9, reach 1 5/9, the full cache 7/9.
    chunk_size: tokens are kept or dropped in chunks of this many positions (1: per token).
    query_reduce: how the window's queries combine into a key's score: "sum" (SnapKV) or
        "max" (`attention_stats_batch`).
    """

    name: ClassVar[str] = "entropy"
    observation_queries: int | None = 16
    exponent: float = 1.0
    min_fraction: float = 0.0
    max_fraction: float = 1.0
    group_reduce: GroupReduce = "mean"
    head_reduce: HeadReduce = "mean"
    reach: int = 32
    chunk_size: int = 32
    query_reduce: QueryReduce = "sum"

    def score(self, layers: list[LayerObservation]) -> LayerScores:
        stats = attention_stats_batch(layers, self.observation_queries, entropy=True,
                                      query_reduce=self.query_reduce)
        tokens = stats.token_scores(self.group_reduce, self.head_reduce)
        carried = carry_forward(tokens, self.reach)
        return LayerScores(chunk_scores(carried, self.chunk_size), stats)

    def allocate(self, scores: LayerScores, budget: Budget, n: int) -> list[int]:
        assert scores.stats is not None
        # The budget split runs on the host, in float64, on the L layer entropies.
        return entropy_budgets(
            scores.stats.layer_entropies().cpu(),
            budget,
            n,
            exponent=self.exponent,
            min_fraction=self.min_fraction,
            max_fraction=self.max_fraction,
        )
