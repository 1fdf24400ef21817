"""SRC: Selection, Reconstruction, Compression of a recycle bin of tokens into a few synthetic
KV pairs, plus the FAIR (tokens) and REAL (bytes) accounting its evaluation reports."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from vllm_entropy_kv.policies.base import Budget, LayerObservation, LayerPlan
from vllm_entropy_kv.policies.budgets import layer_budgets
from vllm_entropy_kv.policies.entropy_merge import merge_groups
from vllm_entropy_kv.policies.registry import register_policy
from vllm_entropy_kv.policies.selection import (
    LayerScores,
    ScorerPolicy,
    complement,
    forced_mask,
    select_tokens,
)
from vllm_entropy_kv.policies.stats import (
    GroupReduce,
    attention_output,
    attention_stats,
    last_queries,
    layer_entropies,
)


# ---------------------------------------------------------------- reconstruction


def group_queries(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[Hq, m, d] -> [Hkv, G*m, d]: each KV head's reference queries (its GQA group's)."""
    num_heads, m, d = queries.shape
    return queries.reshape(num_kv_heads, (num_heads // num_kv_heads) * m, d)


def bin_attention(
    ref_queries: torch.Tensor,
    bin_keys: torch.Tensor,
    bin_values: torch.Tensor,
    scale: float,
    visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attn(Q_ref, K_bin, V_bin): the reference queries' attention restricted to the bin.

    ref_queries: [Hkv, m, d]; bin_keys, bin_values: [Hkv, b, d]; visible: [m, b] causal mask
    or None. Returns (probs [Hkv, m, b], outputs [Hkv, m, d]), float32; a query that sees no
    bin token gets zeros.
    """
    outputs, probs = attention_output(ref_queries, bin_keys, bin_values, scale, visible=visible)
    return probs, outputs


def reconstruction_operator(ref_queries: torch.Tensor, bin_outputs: torch.Tensor) -> torch.Tensor:
    """W = pinv(Q_ref) @ Attn(Q_ref, K_bin, V_bin): [Hkv, d, d], the least-squares linear map
    from a query to the bin's attention output (exact on Q_ref when Q_ref has full row rank,
    or when the outputs are linear in the queries)."""
    return torch.linalg.pinv(ref_queries.float()) @ bin_outputs.float()


def low_rank(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` truncated SVD of [H, d, d]: (U [H, d, r], S [H, r], Vh [H, r, d])."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def _farthest_point_init(features: torch.Tensor, k: int) -> torch.Tensor:
    """k deterministic, spread-out starting centres (farthest-point traversal)."""
    first = (features - features.mean(0)).square().sum(1).argmax()
    chosen = [int(first)]
    dist = (features - features[first]).square().sum(1)
    for _ in range(1, k):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, (features - features[nxt]).square().sum(1))
    return features[chosen].clone()


def cluster(features: torch.Tensor, k: int, iters: int = 10) -> torch.Tensor:
    """[b, f] -> [b] ids in [0, k), every cluster non-empty (needs b >= k): Lloyd's k-means
    from a farthest-point start, so the result is deterministic."""
    b = features.shape[0]
    if k >= b:
        return torch.arange(b, device=features.device) % k
    centres = _farthest_point_init(features, k)
    assign = torch.zeros(b, dtype=torch.int64, device=features.device)
    for _ in range(iters):
        assign = torch.cdist(features, centres).argmin(1)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).float()
        sums = torch.zeros_like(centres).index_add_(0, assign, features)
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        if torch.equal(moved, centres):
            break
        centres = moved
    # An empty cluster takes the point farthest from its centre among clusters of 2 or more.
    for _ in range(k):
        counts = torch.bincount(assign, minlength=k)
        empty = (counts == 0).nonzero()
        if empty.numel() == 0:
            break
        spread = (features - centres[assign]).square().sum(1)
        spread[counts[assign] < 2] = -1.0
        assign[int(spread.argmax())] = int(empty[0])
    return assign


def summarize_bin(
    queries: torch.Tensor,
    bin_keys: torch.Tensor,
    bin_values: torch.Tensor,
    scale: float,
    rank: int,
    *,
    visible: torch.Tensor | None = None,
    value_ridge: float = 1e-3,
    kmeans_iters: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress a recycle bin into `rank` synthetic KV pairs per KV head.

    queries: [Hq, m, d] reference queries (the observation window); bin_keys, bin_values:
    [Hkv, b, d] with b >= rank; visible: [m, b] causal mask of window query i over bin token j.

    1. Reconstruction (the article): O = Attn(Q_ref, K_bin, V_bin), W = pinv(Q_ref) O.
    2. Compression (the article): rank-r SVD W ~ U S V^T; the columns of U are the directions
       in query (= key) space that drive the bin's output, S their weight.
    3. Synthetic keys (our construction; the article stops at the linear map W, which a
       softmax cache cannot hold): each bin key is mapped to its coordinates on those
       directions, (k - mean k) U S, per KV head; the coordinates of all KV heads side by side
       are clustered into r groups shared by the heads (k-means), since `summary_counts` is
       one number per synthetic token. A group's key is the attention-mass-weighted mean of
       its keys, so it stays on the model's key manifold and answers the same queries, and its
       count is the group size (the log(count) bias restores its mass).
    4. Synthetic values: least squares again, against the same reference queries: with
       P = softmax(Q K_syn^T + log count), solve min ||P V - O||^2 + lam ||V - V_merge||^2,
       where V_merge is the groups' mass-weighted mean value and lam = value_ridge * tr(P^T P)
       / r keeps ill-conditioned fits near the plain merge.
    Returns (keys, values [Hkv, r, d] in the input dtype, counts [r] int64).
    """
    num_kv, b, _ = bin_keys.shape
    if b < rank:
        raise ValueError(f"a bin of {b} tokens cannot make {rank} synthetic tokens")
    ref = group_queries(queries, num_kv)
    rows_visible = None
    if visible is not None:
        # Grouped rows repeat the window once per query head of the group.
        rows_visible = visible.repeat(queries.shape[0] // num_kv, 1)
    probs, outputs = bin_attention(ref, bin_keys, bin_values, scale, rows_visible)
    u, s, _ = low_rank(reconstruction_operator(ref, outputs), rank)
    centred = bin_keys.float() - bin_keys.float().mean(1, keepdim=True)
    coords = torch.matmul(centred, u) * s.unsqueeze(1)  # [Hkv, b, r]
    groups = cluster(coords.transpose(0, 1).reshape(b, -1), rank, kmeans_iters)
    mass = probs.sum(1)  # [Hkv, b] attention each bin token got from the reference queries
    keys, merged_values, counts = merge_groups(bin_keys, bin_values, mass, groups, rank)
    values = _fit_values(ref, keys, merged_values, counts, outputs, probs, scale, value_ridge)
    return keys, values.to(bin_values.dtype), counts


def _fit_values(
    ref: torch.Tensor,
    keys: torch.Tensor,
    merged_values: torch.Tensor,
    counts: torch.Tensor,
    outputs: torch.Tensor,
    bin_probs: torch.Tensor,
    scale: float,
    ridge: float,
) -> torch.Tensor:
    """Ridge least squares for the synthetic values (step 4 of `summarize_bin`)."""
    rank = keys.shape[1]
    logits = torch.matmul(ref.float() * scale, keys.float().transpose(1, 2)) + counts.float().log()
    p = torch.softmax(logits, dim=-1)
    # Rows whose query sees no bin token carry no information about the bin.
    p = p * (bin_probs.sum(-1, keepdim=True) > 0)
    gram = p.transpose(1, 2) @ p  # [Hkv, r, r]
    lam = ridge * gram.diagonal(dim1=1, dim2=2).sum(-1) / rank + 1e-12
    eye = torch.eye(rank, dtype=gram.dtype, device=gram.device)
    lhs = gram + lam.view(-1, 1, 1) * eye
    rhs = p.transpose(1, 2) @ outputs + lam.view(-1, 1, 1) * merged_values.float()
    return torch.linalg.solve(lhs, rhs)


# ---------------------------------------------------------------- accounting


def fair_effective_budget(budget_tokens: int, bin_size: int, rank: int) -> int:
    """The article's FAIR comparison: a cache of `budget_tokens` whose recycle bin of
    `bin_size` tokens is compressed to `rank` synthetic ones really holds
    budget - (bin_size - rank) tokens; compare methods at equal values of this."""
    return budget_tokens - (bin_size - rank)


def real_bytes(
    plan: LayerPlan,
    *,
    num_kv_heads: int,
    head_size: int,
    dtype_bytes: int = 2,
    count_bytes: int = 4,
    block_size: int = 1,
) -> int:
    """The article's REAL accounting: bytes one layer's compressed prompt cache occupies.

    K and V for every physical token (rounded up to whole blocks when block_size > 1, as a
    paged cache allocates them) plus one log(count) bias per summary token.
    """
    tokens = plan.num_physical
    if block_size > 1:
        tokens = math.ceil(tokens / block_size) * block_size
    return tokens * 2 * num_kv_heads * head_size * dtype_bytes + plan.num_summaries * count_bytes


@dataclass(frozen=True)
class PlanAccounting:
    """Token accounting of one layer's plan (any policy; summaries are SRC's synthetic tokens
    or EntropyMerge's merged ones).

    kept: real prompt tokens kept; bin_size: prompt tokens folded into summaries; rank:
    summary tokens; nominal: kept + bin_size, the tokens whose information the layer retains;
    effective: FAIR effective budget = nominal - (bin_size - rank) = physical tokens held.
    """

    kept: int
    bin_size: int
    rank: int
    nominal: int
    effective: int


def plan_accounting(plan: LayerPlan) -> PlanAccounting:
    kept = plan.keep.numel()
    rank = plan.num_summaries
    if plan.summary_counts is not None:
        bin_size = int(plan.summary_counts.sum())
    else:
        bin_size = rank
    nominal = kept + bin_size
    effective = fair_effective_budget(nominal, bin_size, rank)
    return PlanAccounting(kept, bin_size, rank, nominal, effective)


# ---------------------------------------------------------------- the policy


@register_policy
@dataclass
class SRCPolicy(ScorerPolicy):
    """SRC (J. Chandra 2026, "Entropy-Guided KV Cache Summarization via Low-Rank Attention
    Reconstruction", DOI 10.5281/zenodo.19657329).

    Selection: each layer keeps its sinks, recent tokens and the budget - rank most attended
    tokens (window attention, GQA-aware). Of the rest (low importance), the `bin_fraction`
    with the highest token entropy (diffuse attention: every observed query looks at them a
    little; `AttentionStats.token_entropy`) go to the recycle bin; the others are evicted.
    Reconstruction and compression: see `summarize_bin`; the bin becomes `rank` synthetic KV
    pairs per KV head, appended as summaries. kept + rank = the layer's budget, so plans are
    FAIR by construction (`plan_accounting(...).effective == plan.num_physical`); `real_bytes`
    gives the REAL accounting.

    observation_queries: the window W; its queries score tokens and are the reference
        queries Q_ref of the least squares.
    rank: synthetic tokens per layer (fewer if the budget leaves no room beside sinks/recent).
    bin_fraction: share of the non-kept tokens sent to the bin (by entropy), in (0, 1].
    allocation: layer budgets, "uniform" (the article's setting), "entropy" or "pyramid".
    value_ridge, kmeans_iters: see `summarize_bin`.
    group_reduce: how the query heads of one KV head combine for token scores.
    """

    name: ClassVar[str] = "src"
    observation_queries: int | None = 32
    rank: int = 8
    bin_fraction: float = 0.5
    allocation: Literal["uniform", "entropy", "pyramid"] = "uniform"
    value_ridge: float = 1e-3
    kmeans_iters: int = 10
    group_reduce: GroupReduce = "mean"

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if not 0 < self.bin_fraction <= 1:
            raise ValueError(f"bin_fraction must be in (0, 1], got {self.bin_fraction}")

    def score(self, obs: LayerObservation, layer_idx: int) -> LayerScores:
        stats = attention_stats(
            obs,
            self.observation_queries,
            entropy=self.allocation == "entropy",
            token_entropy=True,
        )
        return LayerScores(stats.token_scores(self.group_reduce), stats)

    def allocate(self, scores: list[LayerScores], budget: Budget, n: int) -> list[int]:
        entropies = None
        if self.allocation == "entropy":
            entropies = layer_entropies([s.stats for s in scores if s.stats is not None])
        return layer_budgets(self.allocation, budget, n, len(scores), entropies)

    def plan_layer(
        self, obs: LayerObservation, scores: LayerScores, k: int, budget: Budget
    ) -> LayerPlan:
        n = obs.num_tokens
        forced = int(forced_mask(n, budget.sink_tokens, budget.recent_tokens).sum())
        rank = max(0, min(self.rank, k - forced))
        keep = select_tokens(scores.tokens, k - rank, budget.sink_tokens, budget.recent_tokens)
        queries = last_queries(obs, self.observation_queries)
        if rank == 0 or queries.shape[1] == 0 or scores.stats is None:
            return LayerPlan(keep=keep)
        candidates = complement(keep, n)  # n - k + rank >= rank + 1 tokens
        size = min(candidates.numel(), max(rank, math.ceil(self.bin_fraction * candidates.numel())))
        entropy = scores.stats.token_entropy
        assert entropy is not None
        # Highest entropy first; among equal entropies, the least attended first.
        by_score = torch.argsort(scores.tokens[candidates], stable=True)
        by_entropy = torch.argsort(entropy[candidates][by_score], descending=True, stable=True)
        bin_ids = candidates[by_score[by_entropy[:size]]].sort().values
        m = queries.shape[1]
        first = n + obs.query_offset - m
        positions = torch.arange(first, first + m, device=obs.keys.device)
        # Usually the whole bin precedes the window (recent >= W): no mask to apply.
        visible = None
        if int(bin_ids[-1]) >= first:
            visible = bin_ids.unsqueeze(0) <= positions.unsqueeze(1)
        keys, values, counts = summarize_bin(
            queries,
            obs.keys.index_select(1, bin_ids),
            obs.values.index_select(1, bin_ids),
            obs.scale,
            rank,
            visible=visible,
            value_ridge=self.value_ridge,
            kmeans_iters=self.kmeans_iters,
        )
        return LayerPlan(keep=keep, summary_keys=keys, summary_values=values,
                         summary_counts=counts)
