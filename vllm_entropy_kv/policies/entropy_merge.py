"""Entropy budgets, and the dropped tokens merged into summary tokens instead of deleted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_entropy_kv.policies.base import Budget, LayerObservation, LayerPlan
from vllm_entropy_kv.policies.entropy import EntropyPolicy
from vllm_entropy_kv.policies.registry import register_policy
from vllm_entropy_kv.policies.selection import (
    LayerScores,
    complement,
    forced_mask,
    select_tokens,
)


def merge_groups(
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted per-group means of keys and values, per KV head.

    keys, values: [Hkv, t, d]; weights: [Hkv, t] (attention mass, >= 0); group_ids: [t] in
    [0, num_groups), every group non-empty. Returns (keys, values [Hkv, num_groups, d] in the
    input dtype, counts [num_groups] int64). With the log(count) bias a merged token then
    carries the group's mass exactly when the group's keys are equal.
    """
    # 1e-30 only guards 0/0: a group nobody attends to averages uniformly.
    w = weights.float().clamp_min(0) + 1e-30
    num_kv, _, d = keys.shape
    wsum = torch.zeros(num_kv, num_groups, dtype=torch.float32, device=keys.device)
    wsum.index_add_(1, group_ids, w)
    out_k = keys.new_zeros(num_kv, num_groups, d, dtype=torch.float32)
    out_v = values.new_zeros(num_kv, num_groups, values.shape[2], dtype=torch.float32)
    out_k.index_add_(1, group_ids, keys.float() * w.unsqueeze(-1))
    out_v.index_add_(1, group_ids, values.float() * w.unsqueeze(-1))
    out_k /= wsum.unsqueeze(-1)
    out_v /= wsum.unsqueeze(-1)
    counts = torch.bincount(group_ids, minlength=num_groups).to(torch.int64)
    return out_k.to(keys.dtype), out_v.to(values.dtype), counts


def contiguous_groups(
    num_tokens: int, num_groups: int, device: torch.device | None = None
) -> torch.Tensor:
    """[num_tokens] group ids cutting a sequence into num_groups runs of near-equal length."""
    return torch.arange(num_tokens, device=device) * num_groups // num_tokens


def summary_slots(k: int, n: int, fraction: float, budget: Budget) -> int:
    """How many of a layer's k slots go to summaries: about fraction * k (at least one when
    anything is dropped and fraction > 0), never eating into the sinks and recent tokens."""
    if k >= n or fraction <= 0:
        return 0
    forced = int(forced_mask(n, budget.sink_tokens, budget.recent_tokens).sum())
    return max(0, min(max(1, round(fraction * k)), k - forced))


@register_policy
@dataclass
class EntropyMergePolicy(EntropyPolicy):
    """The "EntropyMerged KV cache" framework: entropy-guided layer budgets as in the entropy
    policy; each layer keeps its sinks and best tokens and, instead of deleting the rest,
    merges them into summary tokens.

    Grouping (our choice): the dropped tokens, in prompt order, are cut into runs of equal
    length, one run per summary, so each summary stands for a contiguous stretch of text (a
    run may step over a kept token). Each summary is the attention-mass-weighted mean of its
    run's keys and values, per KV head (mass = what the observed queries of that head's GQA
    group gave each token), and `summary_counts` = run length, so with the log(count) bias it
    weighs like the tokens it replaces. Summaries count against the layer's budget: kept +
    summaries = budget.

    summary_fraction: share of each layer's budget spent on summaries (0 = pure eviction).
    Other parameters: see EntropyPolicy.
    """

    name: ClassVar[str] = "entropy-merge"
    summary_fraction: float = 0.1

    def plan_layer(
        self, obs: LayerObservation, scores: LayerScores, k: int, budget: Budget
    ) -> LayerPlan:
        n = obs.num_tokens
        slots = summary_slots(k, n, self.summary_fraction, budget)
        keep = select_tokens(scores.tokens, k - slots, budget.sink_tokens, budget.recent_tokens)
        if slots == 0 or scores.stats is None:
            return LayerPlan(keep=keep)
        dropped = complement(keep, n)  # n - k + slots >= slots + 1 tokens: no empty run
        mass = scores.stats.kv_head_scores(self.group_reduce).index_select(1, dropped)
        keys, values, counts = merge_groups(
            obs.keys.index_select(1, dropped),
            obs.values.index_select(1, dropped),
            mass,
            contiguous_groups(dropped.numel(), slots, obs.keys.device),
            slots,
        )
        return LayerPlan(keep=keep, summary_keys=keys, summary_values=values,
                         summary_counts=counts)
