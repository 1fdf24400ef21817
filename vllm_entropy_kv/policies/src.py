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
    forced_mask,
    kept_counts,
    mask_positions,
    selection_masks,
)
from vllm_entropy_kv.policies.shards import HeadShard
from vllm_entropy_kv.policies.stats import (
    GroupReduce,
    attention_output,
    attention_stats_batch,
    last_queries,
    select_positions,
    stacks_layers,
)

# Layers summarised per step on a CPU (see `SRCPolicy.plan_layers`).
CPU_SUMMARY_LAYERS = 2


# ---------------------------------------------------------------- reconstruction


def group_queries(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[..., Hq, m, d] -> [..., Hkv, G*m, d]: each KV head's reference queries (its GQA group's)."""
    *lead, num_heads, m, d = queries.shape
    return queries.reshape(*lead, num_kv_heads, (num_heads // num_kv_heads) * m, d)


def bin_attention(
    ref_queries: torch.Tensor,
    bin_keys: torch.Tensor,
    bin_values: torch.Tensor,
    scale: float | torch.Tensor,
    visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attn(Q_ref, K_bin, V_bin): the reference queries' attention restricted to the bin.

    ref_queries: [..., Hkv, m, d]; bin_keys, bin_values: [..., Hkv, b, d]; visible: [m, b]
    (or broadcasting against [..., Hkv, m, b]) mask or None. Returns (probs [..., Hkv, m, b],
    outputs [..., Hkv, m, d]), float32; a query that sees no bin token gets zeros.
    """
    outputs, probs = attention_output(ref_queries, bin_keys, bin_values, scale, visible=visible)
    return probs, outputs


def reconstruction_operator(ref_queries: torch.Tensor, bin_outputs: torch.Tensor) -> torch.Tensor:
    """W = pinv(Q_ref) @ Attn(Q_ref, K_bin, V_bin): [..., Hkv, d, d], the least-squares linear map
    from a query to the bin's attention output (exact on Q_ref when Q_ref has full row rank,
    or when the outputs are linear in the queries)."""
    return torch.linalg.pinv(ref_queries.float()) @ bin_outputs.float()


def low_rank(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` truncated SVD of [..., d, d]: (U [..., d, r], S [..., r], Vh [..., r, d])."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def _gather_rows(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """features [L, b, f], index [L, k] -> [L, k, f]."""
    return features.gather(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def _farthest_point_init(features: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """[L, k, f]: k deterministic, spread-out starting centres per layer (farthest-point
    traversal over the valid points)."""
    count = valid.sum(1).view(-1, 1, 1)
    mean = (features * valid.unsqueeze(-1)).sum(1, keepdim=True) / count.clamp_min(1)
    # Padding rows get -1: never the farthest, and min() keeps them there.
    dist = (features - mean).square().sum(-1).masked_fill(~valid, -1.0)
    chosen = [dist.argmax(1)]
    dist = (features - _gather_rows(features, chosen[0].view(-1, 1))).square().sum(-1)
    dist = dist.masked_fill(~valid, -1.0)
    for _ in range(1, k):
        chosen.append(dist.argmax(1))
        nearest = (features - _gather_rows(features, chosen[-1].view(-1, 1))).square().sum(-1)
        dist = torch.minimum(dist, nearest)
    return _gather_rows(features, torch.stack(chosen, 1)).clone()


def _cluster_sizes(assign: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """[L, k] points per cluster (padding rows counted in a spare cluster k, dropped)."""
    ids = torch.where(valid, assign, k)
    return torch.zeros(assign.shape[0], k + 1, dtype=torch.int64, device=assign.device) \
        .scatter_add_(1, ids, torch.ones_like(ids))[:, :k]


def cluster_batch(
    features: torch.Tensor, valid: torch.Tensor, k: int, iters: int = 10
) -> torch.Tensor:
    """[L, b, f] points (rows where valid [L, b] is False are padding) -> [L, b] ids in
    [0, k), k on padding; every cluster non-empty where a layer has more than k points (a
    layer of at most k points gets ids 0, 1, ...). Lloyd's k-means from a farthest-point start,
    so the result is deterministic; every layer runs all `iters` steps (a converged layer
    stays put), so nothing is read back to decide when to stop."""
    num_layers, b, f = features.shape
    centres = _farthest_point_init(features, valid, k)
    assign = torch.zeros(num_layers, b, dtype=torch.int64, device=features.device)
    spare = torch.where(valid, 0, k)  # padding goes to the spare cluster k, dropped
    for _ in range(iters):
        assign = torch.cdist(features, centres).argmin(-1)
        ids = torch.maximum(assign, spare).unsqueeze(-1)
        counts = _cluster_sizes(assign, valid, k).unsqueeze(-1).float()
        sums = features.new_zeros(num_layers, k + 1, f).scatter_add_(1, ids.expand(-1, -1, f),
                                                                       features)[:, :k]
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    # An empty cluster takes the point farthest from its centre among clusters of 2 or more.
    for _ in range(k):
        counts = _cluster_sizes(assign, valid, k)
        empty = counts == 0
        if features.device.type == "cpu" and not bool(empty.any()):
            break  # the rest would change nothing; reading that back stalls a GPU, not a CPU
        spread = (features - _gather_rows(centres, assign)).square().sum(-1)
        spread = spread.masked_fill((counts.gather(1, assign) < 2) | ~valid, -1.0)
        moved = assign.scatter(1, spread.argmax(1, keepdim=True),
                               empty.int().argmax(1, keepdim=True))
        assign = torch.where(empty.any(1, keepdim=True), moved, assign)
    few = valid.sum(1, keepdim=True) <= k
    positions = torch.arange(b, device=features.device).expand(num_layers, b)
    return torch.where(valid, torch.where(few, positions % k, assign), k)


def cluster(features: torch.Tensor, k: int, iters: int = 10) -> torch.Tensor:
    """[b, f] -> [b] ids in [0, k): `cluster_batch` of one layer."""
    valid = torch.ones(1, features.shape[0], dtype=torch.bool, device=features.device)
    return cluster_batch(features.unsqueeze(0), valid, k, iters)[0]


def summarize_bins(
    queries: torch.Tensor,
    bin_keys: torch.Tensor,
    bin_values: torch.Tensor,
    scale: torch.Tensor,
    rank: int,
    visible: torch.Tensor | None,
    sizes: torch.Tensor,
    *,
    value_ridge: float = 1e-3,
    kmeans_iters: int = 10,
    shard: HeadShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress a recycle bin into `rank` synthetic KV pairs per KV head.

    queries: [L, Hq, m, d] reference queries (the observation window); bin_keys, bin_values:
    [L, Hkv, b, d], each layer's bin padded to b tokens; scale: [L]; visible: [L, m, b] which
    bin token each window query sees (causal mask, False on padding), or None when every
    query sees every token (no padding); sizes: [L] each layer's bin size, >= rank (padding
    follows the bin).

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
    Returns (keys, values [L, Hkv, r, d] in the input dtype, counts [L, r] int64).

    With a `shard` the inputs hold this shard's heads (queries: its KV heads' whole GQA
    groups); the clustering of step 3 runs on the coordinates of every shard's KV heads, so
    all shards form the same groups, and each returns its own KV heads' tokens.
    """
    num_layers, num_kv, b, _ = bin_keys.shape
    valid = torch.arange(b, device=bin_keys.device) < sizes.view(-1, 1)
    scale = scale.view(-1, 1, 1, 1)
    ref = group_queries(queries, num_kv)
    # Grouped rows repeat the window once per query head of the group.
    rows_visible = (None if visible is None
                    else visible.repeat(1, queries.shape[1] // num_kv, 1).unsqueeze(1))
    probs, outputs = bin_attention(ref, bin_keys, bin_values, scale, rows_visible)
    u, s, _ = low_rank(reconstruction_operator(ref, outputs), rank)
    keys_f = bin_keys.float() * valid.view(num_layers, 1, b, 1)
    centred = keys_f - keys_f.sum(2, keepdim=True) / sizes.view(-1, 1, 1, 1)
    coords = torch.matmul(centred, u) * s.unsqueeze(-2)  # [L, Hkv, b, r]
    if shard is not None:
        coords = shard.gather_kv_heads(coords, dim=1)
    groups = cluster_batch(coords.transpose(1, 2).flatten(2), valid, rank, kmeans_iters)
    mass = probs.sum(-2)  # [L, Hkv, b] attention each bin token got from the reference queries
    keys, merged_values, counts = merge_groups(bin_keys, bin_values, mass, groups, rank + 1)
    keys, merged_values, counts = keys[:, :, :rank], merged_values[:, :, :rank], counts[:, :rank]
    values = _fit_values(ref, keys, merged_values, counts, outputs, probs, scale, value_ridge)
    return keys, values.to(bin_values.dtype), counts


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
    """`summarize_bins` of one layer: queries [Hq, m, d], bin_keys, bin_values [Hkv, b, d],
    visible [m, b] or None (every window query sees the whole bin). Returns (keys, values
    [Hkv, r, d], counts [r])."""
    num_kv, b, _ = bin_keys.shape
    if b < rank:
        raise ValueError(f"a bin of {b} tokens cannot make {rank} synthetic tokens")
    keys, values, counts = summarize_bins(
        queries.unsqueeze(0), bin_keys.unsqueeze(0), bin_values.unsqueeze(0),
        torch.tensor([scale], dtype=torch.float32, device=bin_keys.device), rank,
        None if visible is None else visible.unsqueeze(0),
        torch.tensor([b], device=bin_keys.device),
        value_ridge=value_ridge, kmeans_iters=kmeans_iters,
    )
    return keys[0], values[0], counts[0]


def _fit_values(
    ref: torch.Tensor,
    keys: torch.Tensor,
    merged_values: torch.Tensor,
    counts: torch.Tensor,
    outputs: torch.Tensor,
    bin_probs: torch.Tensor,
    scale: torch.Tensor,
    ridge: float,
) -> torch.Tensor:
    """Ridge least squares for the synthetic values (step 4 of `summarize_bins`), batched over
    layers and KV heads: ref [L, Hkv, m, d], keys [L, Hkv, r, d], counts [L, r]."""
    rank = keys.shape[-2]
    bias = counts.float().log().view(-1, 1, 1, rank)
    logits = torch.matmul(ref.float() * scale, keys.float().transpose(-1, -2)) + bias
    p = torch.softmax(logits, dim=-1)
    # Rows whose query sees no bin token carry no information about the bin.
    p = p * (bin_probs.sum(-1, keepdim=True) > 0)
    gram = p.transpose(-1, -2) @ p  # [L, Hkv, r, r]
    lam = (ridge * gram.diagonal(dim1=-2, dim2=-1).sum(-1) / rank + 1e-12)[..., None, None]
    eye = torch.eye(rank, dtype=gram.dtype, device=gram.device)
    rhs = p.transpose(-1, -2) @ outputs + lam * merged_values.float()
    return torch.linalg.solve(gram + lam * eye, rhs)


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
    reads_values: ClassVar[bool] = True
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

    def score(self, layers: list[LayerObservation]) -> LayerScores:
        stats = attention_stats_batch(
            layers,
            self.observation_queries,
            entropy=self.allocation == "entropy",
            token_entropy=True,
        )
        return LayerScores(stats.token_scores(self.group_reduce), stats)

    def allocate(self, scores: LayerScores, budget: Budget, n: int) -> list[int]:
        entropies = None
        if self.allocation == "entropy":
            assert scores.stats is not None
            # The budget split runs on the host, in float64, on the L layer entropies.
            entropies = scores.stats.layer_entropies().cpu()
        return layer_budgets(self.allocation, budget, n, scores.tokens.shape[0], entropies)

    def plan_layers(
        self, layers: list[LayerObservation], scores: LayerScores, ks: list[int], budget: Budget
    ) -> list[LayerPlan]:
        n = scores.tokens.shape[1]
        forced = int(forced_mask(n, budget.sink_tokens, budget.recent_tokens).sum())
        m = 0 if scores.stats is None else scores.stats.num_queries
        # A layer that keeps the whole prompt, or has no reference queries, gets no summaries.
        ranks = [0 if k >= n or m == 0 else max(0, min(self.rank, k - forced)) for k in ks]
        kept = [k - r for k, r in zip(ks, ranks)]
        masks = selection_masks(scores.tokens, kept, budget.sink_tokens, budget.recent_tokens)
        plans = [LayerPlan(keep=keep) for keep in mask_positions(masks, kept_counts(kept, n))]
        # Layers whose bins have the same rank and size are summarised together (with uniform
        # budgets all layers but a block's worth share them). Padding bins to one size would
        # batch every layer, but it moves the softmax sums by an ulp, enough to flip k-means.
        # On a CPU a few layers at a time, so that their bin attention stays in the core's
        # cache (Intel Xeon, 3k tokens, one thread: 2 layers per step 0.38 s, 30 0.45 s).
        sizes = [self._bin_size(n - k, r) for k, r in zip(kept, ranks)]
        for rank, size in sorted({(r, b) for r, b in zip(ranks, sizes) if r > 0}):
            chosen = [i for i in range(len(ks)) if (ranks[i], sizes[i]) == (rank, size)]
            step = len(chosen) if stacks_layers(masks.device) else CPU_SUMMARY_LAYERS
            for part in (chosen[a:a + step] for a in range(0, len(chosen), step)):
                keys, values, counts = self._summarize(
                    layers, scores, masks, part, rank, size, budget.recent_tokens)
                for j, i in enumerate(part):
                    plans[i].summary_keys, plans[i].summary_values = keys[j], values[j]
                    plans[i].summary_counts = counts[j]
        return plans

    def _bin_size(self, candidates: int, rank: int) -> int:
        """How many of a layer's `candidates` non-kept tokens go to its recycle bin."""
        return min(candidates, max(rank, math.ceil(self.bin_fraction * candidates)))

    def _summarize(
        self,
        layers: list[LayerObservation],
        scores: LayerScores,
        masks: torch.Tensor,
        chosen: list[int],
        rank: int,
        size: int,
        recent_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chosen layers' recycle bins of `size` tokens, summarised (`summarize_bins`);
        recent_tokens: the budget's, which every layer with summaries keeps."""
        stats = scores.stats
        assert stats is not None and stats.token_entropy is not None
        n, device = masks.shape[1], masks.device
        index = torch.tensor(chosen, device=device)
        candidates = ~masks.index_select(0, index)  # n - k + rank >= rank + 1 tokens per layer
        # Highest entropy first; among equal entropies, the least attended first. Sorting all
        # n tokens with the others at -inf keeps the candidates' order of a candidates-only sort.
        by_score = torch.argsort(scores.tokens.index_select(0, index), dim=1, stable=True)
        entropy = stats.token_entropy.index_select(0, index).gather(1, by_score)
        entropy = entropy.masked_fill(~candidates.gather(1, by_score), float("-inf"))
        by_entropy = torch.argsort(entropy, dim=1, descending=True, stable=True)
        in_bin = torch.zeros_like(candidates).scatter_(
            1, by_score.gather(1, by_entropy), (torch.arange(n, device=device) < size).expand_as(candidates))
        bin_ids = torch.stack(mask_positions(in_bin, [size] * len(chosen)))  # prompt order
        m = stats.num_queries
        first = n + layers[0].query_offset - m
        positions = torch.arange(first, first + m, device=device)
        # Bins lie before the recent tokens; when those cover the window, every window query
        # sees every bin token and needs no mask.
        every_visible = n - recent_tokens - 1 <= first
        visible = None if every_visible else bin_ids.unsqueeze(1) <= positions.view(1, -1, 1)
        picked = [layers[i] for i in chosen]
        # Each layer's bin tokens, then stacked: stacking whole layers first would copy every
        # key and value of the prompt.
        keys = torch.stack([select_positions(o.keys, ids) for o, ids in zip(picked, bin_ids)])
        values = torch.stack([select_positions(o.values, ids) for o, ids in zip(picked, bin_ids)])
        queries = torch.stack([last_queries(o, self.observation_queries) for o in picked])
        if stats.shard is not None:
            queries = stats.shard.own_group_queries(queries, dim=1)
        return summarize_bins(
            queries,
            keys,
            values,
            torch.tensor([o.scale for o in picked], dtype=torch.float32).to(device),
            rank,
            visible,
            torch.full((len(chosen),), size, device=device),
            value_ridge=self.value_ridge,
            kmeans_iters=self.kmeans_iters,
            shard=stats.shard,
        )
