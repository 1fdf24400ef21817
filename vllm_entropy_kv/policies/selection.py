"""Which tokens a layer keeps: one shared, sorted index set per layer.

`select_tokens` is the only place that turns scores into a keep set; `ScorerPolicy` is the
score -> budget -> select skeleton that most policies share (kvpress's ScorerPress).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_entropy_kv.policies.base import Budget, KVPolicy, LayerObservation, LayerPlan
from vllm_entropy_kv.policies.budgets import uniform_budgets
from vllm_entropy_kv.policies.stats import AttentionStats, prompt_length


def forced_mask(
    n: int, sink_tokens: int, recent_tokens: int, device: torch.device | None = None
) -> torch.Tensor:
    """[n] bool: the first `sink_tokens` and last `recent_tokens` positions (always kept)."""
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[: min(n, sink_tokens)] = True
    if recent_tokens > 0:
        mask[max(0, n - recent_tokens):] = True
    return mask


def keep_all(n: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64, device=device)


def select_tokens(
    scores: torch.Tensor, k: int, sink_tokens: int, recent_tokens: int
) -> torch.Tensor:
    """The k positions to keep: sinks, recent tokens, then the highest scores.

    Returns sorted, unique int64 indices in [0, n), exactly min(k, n) of them. If k is below
    sinks + recent (the budgets never ask for that), the recent tokens go first, then sinks.
    """
    n = scores.numel()
    device = scores.device
    if k >= n:
        return keep_all(n, device)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    forced = forced_mask(n, sink_tokens, recent_tokens, device)
    num_forced = int(forced.sum())
    if num_forced >= k:
        # Tiny budget: the most recent tokens first, then the sinks.
        recent_start = max(0, n - recent_tokens) if recent_tokens > 0 else n
        order = torch.cat([
            torch.arange(recent_start, n, device=device).flip(0),
            torch.arange(min(sink_tokens, recent_start), device=device),
        ])
        return order[:k].sort().values.to(torch.int64)
    # Forced tokens go in whole; the rest of the budget goes to the best other scores. Scores
    # are clamped above -inf (NaN = no information = lowest) so no forced one is picked.
    low = torch.finfo(torch.float32).min / 2
    priority = torch.nan_to_num(scores.float(), nan=low).clamp_min(low)
    priority = priority.masked_fill(forced, float("-inf"))
    # Equal scores (a chunk split by the budget) go to the earlier position, on every device:
    # topk leaves ties to the implementation.
    chosen = torch.argsort(priority, descending=True, stable=True)[: k - num_forced]
    keep = torch.cat([forced.nonzero().squeeze(1), chosen])
    return keep.sort().values.to(torch.int64)


def chunk_scores(scores: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[n] -> [n]: every token gets the mean score of its chunk (positions `[i*c, (i+1)*c)`),
    so `select_tokens` keeps whole chunks (ChunkKV, Liu et al. 2025): a fact survives as a
    phrase instead of scattered tokens. Only the chunk the budget ends in is split.
    NaN scores are left out of the mean; `chunk_size` 1 returns the scores unchanged."""
    if chunk_size <= 1:
        return scores
    n = scores.numel()
    num_chunks = -(-n // chunk_size)
    padded = torch.full((num_chunks * chunk_size,), float("nan"), device=scores.device)
    padded[:n] = scores.float()
    means = torch.nanmean(padded.view(num_chunks, chunk_size), dim=1)
    return means.repeat_interleave(chunk_size)[:n]


def carry_forward(scores: torch.Tensor, reach: int) -> torch.Tensor:
    """[n] -> [n]: every token gets the highest score among itself and the `reach - 1` tokens
    before it, so what follows an attended token is kept with it: a question attends to the
    key of a fact ("San Francisco"), its answer comes after ("Dolores Park"). NaN counts as
    no score; `reach` 1 returns the scores unchanged."""
    if reach <= 1:
        return scores
    low = torch.full((reach - 1,), float("-inf"), device=scores.device)
    padded = torch.cat([low, torch.nan_to_num(scores.float(), nan=float("-inf"))])
    carried = F.max_pool1d(padded.view(1, 1, -1), reach, stride=1).view(-1)
    return carried.masked_fill(carried == float("-inf"), float("nan"))


def complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted int64 positions in [0, n) not in `keep`."""
    mask = torch.ones(n, dtype=torch.bool, device=keep.device)
    mask[keep] = False
    return mask.nonzero().squeeze(1)


@dataclass
class LayerScores:
    """One layer's token scores ([n], higher = keep) and the statistics they came from."""

    tokens: torch.Tensor
    stats: AttentionStats | None = None


class ScorerPolicy(KVPolicy):
    """Score every layer's tokens, split the budget over layers, keep each layer's best.

    Subclasses implement `score`; they may override `allocate` (default: uniform budgets) and
    `plan_layer` (default: plain eviction). Every plan holds exactly its layer's budget.
    """

    @abc.abstractmethod
    def score(self, obs: LayerObservation, layer_idx: int) -> LayerScores:
        """Token scores for one layer."""

    def allocate(self, scores: list[LayerScores], budget: Budget, n: int) -> list[int]:
        return uniform_budgets(budget, n, len(scores))

    def plan_layer(
        self, obs: LayerObservation, scores: LayerScores, k: int, budget: Budget
    ) -> LayerPlan:
        return LayerPlan(
            keep=select_tokens(scores.tokens, k, budget.sink_tokens, budget.recent_tokens)
        )

    def plan(self, layers: list[LayerObservation], budget: Budget) -> list[LayerPlan]:
        n = prompt_length(layers)
        scores = [self.score(obs, i) for i, obs in enumerate(layers)]
        budgets = self.allocate(scores, budget, n)
        # A layer whose budget covers the prompt keeps it whole, whatever the method.
        plans = [
            LayerPlan(keep=keep_all(n, obs.keys.device)) if k >= n
            else self.plan_layer(obs, s, k, budget)
            for obs, s, k in zip(layers, scores, budgets)
        ]
        for plan, s in zip(plans, scores):
            if s.stats is not None and s.stats.head_entropy is not None:
                plan.layer_entropy = s.stats.layer_entropy
        return plans


__all__ = [
    "LayerScores",
    "ScorerPolicy",
    "carry_forward",
    "chunk_scores",
    "complement",
    "forced_mask",
    "keep_all",
    "select_tokens",
]
