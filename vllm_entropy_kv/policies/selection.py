"""Which tokens a layer keeps: one shared, sorted index set per layer.

`selection_masks` is the only place that turns scores into keep sets, for all layers of a
request at once; `ScorerPolicy` is the score -> budget -> select skeleton that most policies
share (kvpress's ScorerPress).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
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


def forced_order(
    n: int, sink_tokens: int, recent_tokens: int, device: torch.device | None = None
) -> torch.Tensor:
    """The forced positions, most wanted first: the recent tokens from the last, then sinks."""
    recent_start = max(0, n - recent_tokens) if recent_tokens > 0 else n
    return torch.cat([
        torch.arange(recent_start, n, device=device).flip(0),
        torch.arange(min(sink_tokens, recent_start), device=device),
    ])


def selection_masks(
    scores: torch.Tensor, ks: Sequence[int], sink_tokens: int, recent_tokens: int
) -> torch.Tensor:
    """[L, n] bool: for every layer, the ks[l] positions to keep: sinks, recent tokens, then
    the highest scores (equal scores: the earlier position).

    Exactly min(max(k, 0), n) per layer. If k is below sinks + recent (the budgets never ask
    for that), the recent tokens go first, then sinks.
    """
    num_layers, n = scores.shape
    device = scores.device
    forced = forced_order(n, sink_tokens, recent_tokens, device)
    # Scores are clamped above -inf (NaN = no information = lowest) so that the forced
    # tokens, at -inf, sort after every other one and are cut off below.
    low = torch.finfo(torch.float32).min / 2
    priority = torch.nan_to_num(scores.float(), nan=low).clamp_min(low)
    priority[:, forced] = float("-inf")
    # Stable: topk leaves ties (a chunk split by the budget) to the implementation.
    best = torch.argsort(priority, dim=-1, descending=True, stable=True)
    order = torch.cat([forced.expand(num_layers, -1), best[:, : n - forced.numel()]], dim=1)
    k = torch.tensor(list(ks), device=device).view(-1, 1)
    taken = torch.arange(n, device=device) < k
    return torch.zeros_like(taken).scatter_(1, order, taken)


def mask_positions(masks: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    """Each row's True positions (sorted int64), given how many each row has: compacted on
    the device, without reading the masks back."""
    num_layers, n = masks.shape
    width = max(counts, default=0)
    # A row's j-th True goes to slot j; the False ones all go to the spare last slot.
    slots = torch.where(masks, masks.cumsum(1) - 1, width)
    positions = torch.arange(n, device=masks.device).expand(num_layers, n)
    out = torch.zeros(num_layers, width + 1, dtype=torch.int64, device=masks.device)
    out.scatter_(1, slots, positions)
    return [out[i, :c] for i, c in enumerate(counts)]


def kept_counts(ks: Sequence[int], n: int) -> list[int]:
    return [min(max(k, 0), n) for k in ks]


def select_tokens(
    scores: torch.Tensor, k: int, sink_tokens: int, recent_tokens: int
) -> torch.Tensor:
    """One layer's `selection_masks`, as sorted, unique int64 indices in [0, n)."""
    masks = selection_masks(scores.unsqueeze(0), [k], sink_tokens, recent_tokens)
    return mask_positions(masks, kept_counts([k], scores.numel()))[0]


def chunk_scores(scores: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[..., n] -> [..., n]: every token gets the mean score of its chunk (positions
    `[i*c, (i+1)*c)`), so `select_tokens` keeps whole chunks (ChunkKV, Liu et al. 2025): a fact
    survives as a phrase instead of scattered tokens. Only the chunk the budget ends in is
    split. NaN scores are left out of the mean; `chunk_size` 1 returns the scores unchanged."""
    if chunk_size <= 1:
        return scores
    n = scores.shape[-1]
    num_chunks = -(-n // chunk_size)
    padded = torch.full((*scores.shape[:-1], num_chunks * chunk_size), float("nan"),
                        device=scores.device)
    padded[..., :n] = scores.float()
    means = torch.nanmean(padded.unflatten(-1, (num_chunks, chunk_size)), dim=-1)
    return means.repeat_interleave(chunk_size, dim=-1)[..., :n]


def carry_forward(scores: torch.Tensor, reach: int) -> torch.Tensor:
    """[..., n] -> [..., n]: every token gets the highest score among itself and the
    `reach - 1` tokens before it, so what follows an attended token is kept with it: a
    question attends to the key of a fact ("San Francisco"), its answer comes after ("Dolores
    Park"). NaN counts as no score; `reach` 1 returns the scores unchanged."""
    if reach <= 1:
        return scores
    low = torch.full((*scores.shape[:-1], reach - 1), float("-inf"), device=scores.device)
    padded = torch.cat([low, torch.nan_to_num(scores.float(), nan=float("-inf"))], dim=-1)
    carried = F.max_pool1d(padded.reshape(-1, 1, padded.shape[-1]), reach, stride=1)
    carried = carried.view(scores.shape)
    return carried.masked_fill(carried == float("-inf"), float("nan"))


def complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted int64 positions in [0, n) not in `keep`."""
    mask = torch.ones(n, dtype=torch.bool, device=keep.device)
    mask[keep] = False
    return mask.nonzero().squeeze(1)


@dataclass
class LayerScores:
    """Every layer's token scores ([L, n], higher = keep) and the statistics they came from."""

    tokens: torch.Tensor
    stats: AttentionStats | None = None


class ScorerPolicy(KVPolicy):
    """Score every layer's tokens, split the budget over layers, keep each layer's best.

    Subclasses implement `score` (all layers at once); they may override `allocate` (default:
    uniform budgets) and `plan_layers` (default: plain eviction). Every plan holds exactly its
    layer's budget; a layer whose budget covers the prompt keeps it whole.
    """

    @abc.abstractmethod
    def score(self, layers: list[LayerObservation]) -> LayerScores:
        """Token scores of every layer."""

    def allocate(self, scores: LayerScores, budget: Budget, n: int) -> list[int]:
        return uniform_budgets(budget, n, scores.tokens.shape[0])

    def plan_layers(
        self, layers: list[LayerObservation], scores: LayerScores, ks: list[int], budget: Budget
    ) -> list[LayerPlan]:
        masks = selection_masks(scores.tokens, ks, budget.sink_tokens, budget.recent_tokens)
        keeps = mask_positions(masks, kept_counts(ks, scores.tokens.shape[1]))
        return [LayerPlan(keep=keep) for keep in keeps]

    def plan(self, layers: list[LayerObservation], budget: Budget) -> list[LayerPlan]:
        n = prompt_length(layers)
        scores = self.score(layers)
        plans = self.plan_layers(layers, scores, self.allocate(scores, budget, n), budget)
        if scores.stats is not None and scores.stats.head_entropy is not None:
            # The one read-back of the plan's statistics.
            for plan, entropy in zip(plans, scores.stats.layer_entropies().tolist()):
                plan.layer_entropy = entropy
        return plans


__all__ = [
    "LayerScores",
    "ScorerPolicy",
    "carry_forward",
    "chunk_scores",
    "complement",
    "forced_mask",
    "forced_order",
    "keep_all",
    "kept_counts",
    "mask_positions",
    "select_tokens",
    "selection_masks",
]
