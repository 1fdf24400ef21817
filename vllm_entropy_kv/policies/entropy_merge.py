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
    forced_mask,
    kept_counts,
    mask_positions,
    selection_masks,
)
from vllm_entropy_kv.policies.stats import stack_layers, stacks_layers


def merge_groups(
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted per-group means of keys and values, per KV head, for any leading dimensions
    (e.g. layers).

    keys, values: [..., Hkv, t, d]; weights: [..., Hkv, t] (attention mass, >= 0); group_ids:
    [..., t] in [0, num_groups). Returns (keys, values [..., Hkv, num_groups, d] in the input
    dtype, counts [..., num_groups] int64); an empty group's key and value are 0. With the
    log(count) bias a merged token then carries the group's mass exactly when the group's
    keys are equal.
    """
    # 1e-30 only guards 0/0: a group nobody attends to averages uniformly.
    w = weights.float().clamp_min(0) + 1e-30
    per_head = group_ids.unsqueeze(-2).expand(w.shape)
    wsum = w.new_zeros(*w.shape[:-1], num_groups).scatter_add_(-1, per_head, w)
    rows = per_head.unsqueeze(-1)

    def weighted_sum(x: torch.Tensor) -> torch.Tensor:
        out = w.new_zeros(*x.shape[:-2], num_groups, x.shape[-1])
        return out.scatter_add_(-2, rows.expand(x.shape), x.float() * w.unsqueeze(-1))

    out_k = weighted_sum(keys) / wsum.unsqueeze(-1)
    out_v = weighted_sum(values) / wsum.unsqueeze(-1)
    counts = torch.zeros(*group_ids.shape[:-1], num_groups, dtype=torch.int64,
                         device=group_ids.device).scatter_add_(-1, group_ids, torch.ones_like(group_ids))
    return out_k.to(keys.dtype), out_v.to(values.dtype), counts


def run_ids(ranks: torch.Tensor, num_groups: int | torch.Tensor,
            num_tokens: int | torch.Tensor) -> torch.Tensor:
    """Group ids cutting `num_tokens` tokens (the ranks 0.. of the tokens) into `num_groups`
    runs of near-equal length; the counts may be tensors that broadcast against `ranks`."""
    return ranks * num_groups // num_tokens


def contiguous_groups(
    num_tokens: int, num_groups: int, device: torch.device | None = None
) -> torch.Tensor:
    """[num_tokens] group ids cutting a sequence into num_groups runs of near-equal length."""
    return run_ids(torch.arange(num_tokens, device=device), num_groups, num_tokens)


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
    reads_values: ClassVar[bool] = True
    summary_fraction: float = 0.1

    def plan_layers(
        self, layers: list[LayerObservation], scores: LayerScores, ks: list[int], budget: Budget
    ) -> list[LayerPlan]:
        n = scores.tokens.shape[1]
        slots = [summary_slots(k, n, self.summary_fraction, budget) for k in ks]
        kept = [k - s for k, s in zip(ks, slots)]
        masks = selection_masks(scores.tokens, kept, budget.sink_tokens, budget.recent_tokens)
        plans = [LayerPlan(keep=keep) for keep in mask_positions(masks, kept_counts(kept, n))]
        merging = [i for i, s in enumerate(slots) if s > 0]
        if not merging or scores.stats is None:
            return plans
        device = scores.tokens.device
        index = torch.tensor(merging, device=device)
        dropped = ~masks.index_select(0, index)  # n - k + slots >= slots + 1 tokens: no empty run
        num_slots = torch.tensor([slots[i] for i in merging], device=device).view(-1, 1)
        num_dropped = torch.tensor([n - kept[i] for i in merging], device=device).view(-1, 1)
        runs = run_ids(dropped.cumsum(1) - 1, num_slots, num_dropped)
        spare = max(slots)  # the group the kept tokens go to, thrown away
        group_ids = torch.where(dropped, runs, spare)
        weights = scores.stats.own_kv_head_scores(self.group_reduce).index_select(0, index)
        step = len(merging) if stacks_layers(device) else 1
        for a in range(0, len(merging), step):
            batch = merging[a : a + step]
            keys, values, counts = merge_groups(
                stack_layers([layers[i].keys for i in batch]),
                stack_layers([layers[i].values for i in batch]),
                weights[a : a + step],
                group_ids[a : a + step],
                spare + 1,
            )
            for j, i in enumerate(batch):
                plans[i].summary_keys = keys[j, :, : slots[i]]
                plans[i].summary_values = values[j, :, : slots[i]]
                plans[i].summary_counts = counts[j, : slots[i]]
        return plans
