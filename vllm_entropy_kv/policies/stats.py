"""Attention statistics of a prefill, shared by every policy, the evaluation and the engine.

`attention_stats_batch` measures all layers of a request at once: `L` layers, `Hq` query heads,
`Hkv` KV heads, `n` prompt tokens, the last `M` prompt queries (the observation window, or
every prompt query for H2O). Query head `h` reads KV head `h // (Hq // Hkv)` (GQA). The
observed query `i` sits at prompt position `n - M + i` and sees keys `<= n - M + i` (causal).
`attention_stats` is the same computation for one layer.

Cost: scores are computed in batched ops over KV heads and a chunk of queries, against the
visible keys only, so memory stays at `chunk_elements` scores and no `n x n` matrix is ever
built. On a GPU the layers are stacked too, so the number of kernel launches does not grow
with the number of layers. On a CPU a launch costs microseconds and stacking would copy every
key (a third of the time), so each layer's keys are read in place, fastest as float32 with
positions contiguous (`[Hkv, d, n]` storage, as the engine reads them back). Nothing here
reads a value back to the host. All arithmetic is float32 whatever the input dtype. With a
`HeadShard` on the observations (tensor parallelism) each shard computes its own heads'
statistics and then exchanges them (`shards.py`), so every shard returns the statistics of
all heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from vllm_entropy_kv.policies.base import LayerObservation, LayerPlan
from vllm_entropy_kv.policies.shards import HeadShard

GroupReduce = Literal["mean", "max", "sum"]
# How a layer's KV heads combine into its one token score: "mean" (the entropy paper) or
# "max" (AdaKV-style head-adaptive allocation within one shared token set).
HeadReduce = Literal["mean", "max"]
# How the observed queries' attention to a key combines: "sum" (SnapKV, H2O) or "max" (the
# key's share of the query that attends to it most: a few queries naming one of several
# asked keys are not outvoted by the rest of the window).
QueryReduce = Literal["sum", "max"]
QUERY_REDUCTIONS: tuple[str, ...] = get_args(QueryReduce)

# Scores materialised at once (layers x heads x query chunk x visible keys). On a GPU 4M
# floats = 16 MB, large enough that a request's layers take a handful of batched steps; on a
# CPU 1M floats = 4 MB, one layer's window up to ~7k tokens for the embedded model, which
# stays near the core's cache (Intel Xeon, 3k tokens, one thread: 1M 43 ms, 4M 90 ms).
DEFAULT_CHUNK_ELEMENTS = 1 << 22
CPU_CHUNK_ELEMENTS = 1 << 20


def check_observation(obs: LayerObservation) -> None:
    """Raise ValueError unless the observation's shapes fit the contract in `base.py`."""
    q, k, v = obs.queries, obs.keys, obs.values
    if q.dim() != 3 or k.dim() != 3 or (v is not None and v.dim() != 3):
        raise ValueError(
            f"queries, keys, values must be 3-D, got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{None if v is None else tuple(v.shape)}"
        )
    if v is not None and k.shape[:2] != v.shape[:2]:
        raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} differ in [Hkv, n]")
    if q.shape[0] % k.shape[0] != 0:
        raise ValueError(f"{q.shape[0]} query heads are not a multiple of {k.shape[0]} KV heads")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"query size {q.shape[2]} != key size {k.shape[2]}")
    if obs.query_offset < 0:
        raise ValueError(f"query_offset must be >= 0, got {obs.query_offset}")
    if q.shape[1] > k.shape[1] + obs.query_offset:
        raise ValueError(f"{q.shape[1]} observed queries for only "
                         f"{k.shape[1] + obs.query_offset} prompt tokens")
    if k.shape[1] < 1:
        raise ValueError("empty prompt")


def prompt_length(layers: Sequence[LayerObservation]) -> int:
    """The prompt length `n` shared by all layers (validating every observation)."""
    if not layers:
        raise ValueError("no layers to plan")
    for obs in layers:
        check_observation(obs)
    lengths = {obs.num_tokens for obs in layers}
    if len(lengths) != 1:
        raise ValueError(f"layers disagree on the prompt length: {sorted(lengths)}")
    return lengths.pop()


def last_queries(obs: LayerObservation, num_queries: int | None) -> torch.Tensor:
    """The last `num_queries` observed queries ([Hq, M, d]); None keeps all that were passed."""
    if num_queries is None or num_queries >= obs.queries.shape[1]:
        return obs.queries
    return obs.queries[:, obs.queries.shape[1] - num_queries:]


@dataclass
class AttentionStats:
    """What the observed queries say about the keys, for L layers (leading dimension) or, from
    `attention_stats`, for one layer (no leading dimension).

    head_entropy: [L, Hq] Shannon entropy of each query's attention, divided by log(keys it
        can see) so it lies in [0, 1], averaged over the observed queries; None when not
        asked for.
    head_scores: [L, Hq, n] attention mass each key received, summed over the observed queries
        (or its most from one query, with query_reduce "max").
    num_kv_heads: Hkv, for GQA-aware aggregation.
    num_queries: M, the number of observed queries.
    token_entropy: [L, n] or None; see `attention_stats_batch(token_entropy=True)`.
    shard: the observations' `HeadShard`, if any; the statistics then cover the heads of
        every shard, and `own_kv_head_scores` picks this shard's.
    """

    head_entropy: torch.Tensor | None
    head_scores: torch.Tensor
    num_kv_heads: int
    num_queries: int
    token_entropy: torch.Tensor | None = None
    shard: HeadShard | None = None

    def layer_entropies(self) -> torch.Tensor:
        """[L] (or a scalar for one layer): the entropy paper's layer score, the mean normalised
        entropy of the layer's heads."""
        if self.head_entropy is None:
            raise ValueError("entropy was not computed; call attention_stats(entropy=True)")
        return self.head_entropy.mean(-1)

    @property
    def layer_entropy(self) -> float:
        """One layer's score (stats from `attention_stats`)."""
        return float(self.layer_entropies())

    def kv_head_scores(self, group_reduce: GroupReduce = "mean") -> torch.Tensor:
        """[L, Hkv, n]: each KV head's key scores, reduced over the query heads of its group."""
        return reduce_groups(self.head_scores, self.num_kv_heads, group_reduce)

    def own_kv_head_scores(self, group_reduce: GroupReduce = "mean") -> torch.Tensor:
        """[L, Hkv', n]: `kv_head_scores` of the KV heads the observations hold (all of them
        without a shard)."""
        scores = self.kv_head_scores(group_reduce)
        return scores if self.shard is None else scores[..., self.shard.kv_heads, :]

    def token_scores(
        self, group_reduce: GroupReduce = "mean", head_reduce: HeadReduce = "mean"
    ) -> torch.Tensor:
        """[L, n]: one score per key for each layer (GQA groups, then KV heads)."""
        return aggregate_heads(self.head_scores, self.num_kv_heads, group_reduce, head_reduce)

    def layer(self, index: int) -> AttentionStats:
        """One layer's statistics, without the leading dimension."""
        return AttentionStats(
            head_entropy=None if self.head_entropy is None else self.head_entropy[index],
            head_scores=self.head_scores[index],
            num_kv_heads=self.num_kv_heads,
            num_queries=self.num_queries,
            token_entropy=None if self.token_entropy is None else self.token_entropy[index],
            shard=self.shard,
        )


_REDUCTIONS = {"mean": torch.Tensor.mean, "max": torch.Tensor.amax, "sum": torch.Tensor.sum}


def _reduce_heads(scores: torch.Tensor, how: str, allowed: tuple[str, ...], name: str
                  ) -> torch.Tensor:
    """`scores` reduced over dim -2 by `how`, one of `allowed` (else an error naming `name`)."""
    if how not in allowed:
        valid = " or ".join(", ".join(repr(a) for a in allowed).rsplit(", ", 1))
        raise ValueError(f"{name} must be {valid}, got {how!r}")
    return _REDUCTIONS[how](scores, -2)


def reduce_groups(
    head_scores: torch.Tensor, num_kv_heads: int, group_reduce: GroupReduce = "mean"
) -> torch.Tensor:
    """[..., Hq, n] -> [..., Hkv, n], reducing the query heads that share a KV head."""
    grouped = head_scores.unflatten(-2, (num_kv_heads, -1))
    return _reduce_heads(grouped, group_reduce, ("mean", "max", "sum"), "group_reduce")


def aggregate_heads(
    head_scores: torch.Tensor,
    num_kv_heads: int,
    group_reduce: GroupReduce = "mean",
    head_reduce: HeadReduce = "mean",
) -> torch.Tensor:
    """[..., Hq, n] per-head scores -> [..., n] layer scores: reduce each GQA group, then the
    KV heads, so the layer keeps one token set for all its heads.

    head_reduce "mean" averages the KV heads (entropy paper). "max" is AdaKV's head-adaptive
    allocation (Feng et al. 2024) under one shared token set: AdaKV keeps the top entries of
    all heads' scores taken together, so a head with concentrated attention spends little
    budget and a diffuse one more; walking those entries in descending order until B distinct
    tokens are covered keeps exactly the B tokens with the highest score in any head. Every
    head's scores are on one scale, so heads compare as they are: with query_reduce "sum" a
    head's scores sum to the number of observed queries, with "max" each is one query's
    attention to the token, at most 1."""
    grouped = reduce_groups(head_scores, num_kv_heads, group_reduce)
    return _reduce_heads(grouped, head_reduce, ("mean", "max"), "head_reduce")


def _causal_logits(
    queries: torch.Tensor, keys: torch.Tensor, start: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of queries at positions start.. against the keys they can see.

    queries: [..., Hkv, G, c, d] float32, already scaled; keys: [..., Hkv, n, d] float32; out:
    optional flat float32 workspace, large enough. Returns [..., Hkv, G, c, min(start + c, n)]
    with -inf where a key lies after the query (only columns start.. can be masked).
    """
    g, c = queries.shape[-3:-1]
    width = min(start + c, keys.shape[-2])
    q = queries.flatten(-3, -2)
    visible = keys[..., :width, :].transpose(-1, -2)
    if out is None:
        logits = torch.matmul(q, visible)
    else:
        logits = out[: q.shape[:-1].numel() * width].view(*q.shape[:-1], width)
        torch.matmul(q, visible, out=logits)
    logits = logits.unflatten(-2, (g, c))
    mask = _future_keys(start, c, width, logits.device)
    if mask is not None:
        logits[..., start:].masked_fill_(mask, float("-inf"))
    return logits


def _future_keys(start: int, c: int, width: int, device: torch.device) -> torch.Tensor | None:
    """[c, width - start] bool: key start + j lies after query start + i (j > i); None when
    no key of columns start..width is in the future of any query."""
    if width - start < 2:
        return None
    keys_after = torch.arange(width - start, device=device)
    return keys_after.unsqueeze(0) > torch.arange(c, device=device).unsqueeze(1)


def stacked_queries(layers: Sequence[LayerObservation], num_queries: int | None) -> torch.Tensor:
    """[L, Hq, M, d] float32: every layer's last `num_queries` queries times its scale.

    Raises ValueError unless the layers agree on heads, head size, observed queries and
    query_offset (one request's layers do), which batching over layers needs.
    """
    queries = [last_queries(obs, num_queries) for obs in layers]
    first = layers[0]
    for obs, q in zip(layers, queries):
        if (q.shape != queries[0].shape or obs.keys.shape != first.keys.shape
                or obs.query_offset != first.query_offset):
            raise ValueError("the layers of one request must agree on heads, head size, "
                             "observed queries and query_offset")
    scales = torch.tensor([obs.scale for obs in layers], dtype=torch.float32)
    return torch.stack(queries).float() * scales.to(first.keys.device).view(-1, 1, 1, 1)


def stacks_layers(device: torch.device) -> bool:
    """Whether work done per layer is batched by stacking the layers: on a GPU, where kernel
    launches dominate; not on a CPU, where stacking copies every tensor and one layer's work
    stays in the core's cache (Intel Xeon, 3k tokens, one thread: entropy-merge's merge takes
    237 ms stacked, 88 ms a layer at a time)."""
    return device.type != "cpu"


def stack_layers(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[l, ...]: one tensor as a view (no copy), several stacked."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))


def attention_stats_batch(
    layers: Sequence[LayerObservation],
    num_queries: int | None = 32,
    *,
    entropy: bool = True,
    token_entropy: bool = False,
    chunk_elements: int | None = None,
    stacked: bool | None = None,
    query_reduce: QueryReduce = "sum",
) -> AttentionStats:
    """Entropy and key scores of every layer's last `num_queries` observed queries.

    entropy: compute `head_entropy` (score-only policies skip it and save ~10% of the time).
    token_entropy: also compute, per key, the normalised entropy of the attention it receives
        across all (head, query) pairs that can see it: 1 = every query attends to it alike
        (diffuse, "high-entropy" token), 0 = one query alone attends to it. SRC uses it.
    chunk_elements: scores materialised at once; None: the default of the batching (above).
    stacked: batch several layers per step (None: `stacks_layers(device)`).
    query_reduce: how `head_scores` combine the queries (`QueryReduce`); `token_entropy`
        needs their sum.
    """
    if query_reduce not in QUERY_REDUCTIONS or (token_entropy and query_reduce != "sum"):
        valid = " or ".join(repr(r) for r in QUERY_REDUCTIONS)
        raise ValueError(f"query_reduce must be {valid} ('sum' with token_entropy), "
                         f"got {query_reduce!r}")
    n = prompt_length(layers)
    queries = stacked_queries(layers, num_queries)
    num_layers, num_heads, m, d = queries.shape
    num_kv = layers[0].keys.shape[0]
    group = num_heads // num_kv
    first = n + layers[0].query_offset - m  # prompt position of the first observed query
    device = layers[0].keys.device
    queries = queries.view(num_layers, num_kv, group, m, d)

    head_scores = torch.zeros(num_layers, num_heads, n, dtype=torch.float32, device=device)
    entropy_sum = torch.zeros(num_layers, num_heads, dtype=torch.float32, device=device)
    # sum over (head, query) of p log p per key, for token_entropy.
    plogp = torch.zeros(num_layers, n, dtype=torch.float32, device=device) if token_entropy else None
    if stacked is None:
        stacked = stacks_layers(device)
    if chunk_elements is None:
        chunk_elements = DEFAULT_CHUNK_ELEMENTS if stacked else CPU_CHUNK_ELEMENTS
    # Whole windows of as many layers as fit in chunk_elements (one layer unless stacked),
    # else one layer in query chunks.
    per_query = num_heads * n
    chunk = max(1, min(m, chunk_elements // per_query))
    step = max(1, chunk_elements // (per_query * max(m, 1))) if chunk == m and stacked else 1
    # Two workspaces reused by every step: fresh multi-MB tensors per step cost page faults
    # comparable to the softmax itself.
    logits_buf = torch.empty(min(step, num_layers) * chunk * per_query, dtype=torch.float32,
                             device=device)
    probs_buf = torch.empty_like(logits_buf)

    for a in range(0, num_layers, step):
        b = min(num_layers, a + step)
        keys = stack_layers([obs.keys for obs in layers[a:b]]).float()
        for lo in range(0, m, chunk):
            hi = min(m, lo + chunk)
            start = first + lo
            logits = _causal_logits(queries[a:b, :, :, lo:hi], keys, start, logits_buf)
            width = logits.shape[-1]
            probs = probs_buf[: logits.numel()].view_as(logits)
            torch.softmax(logits, dim=-1, out=probs)
            if query_reduce == "max":
                torch.maximum(head_scores[a:b, :, :width], probs.amax(-2).flatten(1, 2),
                              out=head_scores[a:b, :, :width])
            else:
                head_scores[a:b, :, :width] += probs.sum(-2).flatten(1, 2)
            if not (entropy or token_entropy):
                continue
            # log Z = max logit - log(max prob): exact, and saves a second pass of exp.
            log_z = logits.amax(-1) - probs.amax(-1).log()
            mask = _future_keys(start, hi - lo, width, device)
            if mask is not None:
                # 0 * -inf would poison the products below; the probs there are 0 anyway.
                logits[..., start:].masked_fill_(mask, 0.0)
            # p * logit, in place: log p = logit - log Z, so both entropies follow from it.
            weighted = logits.mul_(probs)
            if entropy:
                # H = -sum p log p = log Z - sum p * logit.
                row_entropy = log_z - weighted.sum(-1)
                visible = torch.arange(start + 1, start + 1 + hi - lo, device=device).clamp(max=n)
                norm = visible.float().log().clamp_min(1e-12)  # 1 visible key: H = 0
                entropy_sum[a:b] += (row_entropy.clamp_min(0) / norm).sum(-1).flatten(1, 2)
            if plogp is not None:
                # KV head by KV head, as the per-layer code summed: SRC ranks tokens by this
                # entropy, and one sum over all heads rounded differently enough (~1e-6) to
                # swap near-equal tokens in and out of a recycle bin.
                for kv in range(num_kv):
                    plogp[a:b, :width] += weighted[:, kv].sum((1, 2))
                    plogp[a:b, :width] -= torch.einsum("lgcn,lgc->ln", probs[:, kv], log_z[:, kv])

    shard = layers[0].shard
    if shard is not None:
        # Every shard's heads (tensor parallelism): scores over prompt positions, not keys.
        head_scores = shard.gather_query_heads(head_scores, dim=1)
        entropy_sum = shard.gather_query_heads(entropy_sum, dim=1) if entropy else entropy_sum
        plogp = None if plogp is None else shard.sum(plogp)
        num_heads, num_kv = head_scores.shape[1], shard.total_kv_heads
    stats = AttentionStats(
        head_entropy=entropy_sum / max(m, 1) if entropy else None,
        head_scores=head_scores,
        num_kv_heads=num_kv,
        num_queries=m,
        shard=shard,
    )
    if plogp is not None:
        stats.token_entropy = _key_entropy(head_scores.sum(-2), plogp, num_heads, m, first)
    return stats


def attention_stats(
    obs: LayerObservation,
    num_queries: int | None = 32,
    *,
    entropy: bool = True,
    token_entropy: bool = False,
    chunk_elements: int | None = None,
) -> AttentionStats:
    """`attention_stats_batch` of one layer (no leading layer dimension)."""
    return attention_stats_batch(
        [obs], num_queries, entropy=entropy, token_entropy=token_entropy,
        chunk_elements=chunk_elements,
    ).layer(0)


def _key_entropy(
    mass: torch.Tensor, plogp: torch.Tensor, num_heads: int, m: int, first: int
) -> torch.Tensor:
    """[..., n]: normalised entropy of each key's received attention over (head, query) pairs.

    With S = sum_i p_i: H = -sum (p_i / S) log(p_i / S) = log S - sum p_i log p_i / S,
    divided by log(number of pairs that see the key).
    """
    positions = torch.arange(mass.shape[-1], device=mass.device)
    # Key j is seen by every observed query at position >= j.
    seen_by = m - (positions - first).clamp(min=0)
    pairs = (num_heads * seen_by).float()
    safe = mass.clamp_min(torch.finfo(torch.float32).tiny)
    entropy = safe.log() - plogp / safe
    norm = pairs.log()
    out = torch.where(norm > 0, entropy / norm.clamp_min(1e-12), torch.zeros_like(entropy))
    # A key nobody attends to is as "diffuse" as it gets.
    out = torch.where(mass > 0, out, torch.ones_like(out))
    return out.clamp(0.0, 1.0)


def layer_entropies(stats: Sequence[AttentionStats]) -> torch.Tensor:
    """[L] the per-layer scores of the entropy paper."""
    return torch.tensor([s.layer_entropy for s in stats], dtype=torch.float32)


def attention_probs(
    queries: torch.Tensor, keys: torch.Tensor, scale: float, start: int | None = None
) -> torch.Tensor:
    """[Hq, m, n] causal softmax of queries at positions start.. (default: the last m) over keys.

    A reference and test helper: it materialises the whole matrix, so keep m small.
    """
    num_heads, m, d = queries.shape
    num_kv, n, _ = keys.shape
    start = n - m if start is None else start
    grouped = (queries.float() * scale).view(num_kv, num_heads // num_kv, m, d)
    probs = torch.softmax(_causal_logits(grouped, keys.float(), start), dim=-1)
    out = torch.zeros(num_heads, m, n, dtype=torch.float32, device=keys.device)
    out[..., : probs.shape[-1]] = probs.flatten(0, 1)
    return out


def attention_output(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float | torch.Tensor,
    log_bias: torch.Tensor | None = None,
    visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries over keys, GQA-aware; by default every query sees every key
    (e.g. decode queries). Leading dimensions (e.g. layers) are batched.

    queries: [..., Hq, m, d]; keys, values: [..., Hkv, t, d]; scale: a number, or a tensor
    broadcasting against [..., Hkv, group * m, d]; log_bias: [t] added to every score
    (log(count) for summary tokens, 0 for real ones); visible: [group * m, t] bool (or
    broadcasting against [..., Hkv, group * m, t]), which key each query row of a GQA group
    sees (a row that sees none gets zeros). Returns (output [..., Hq, m, d],
    probs [..., Hq, m, t]), both float32.
    """
    *lead, num_heads, m, d = queries.shape
    num_kv = keys.shape[-3]
    group = num_heads // num_kv
    q = queries.float().reshape(*lead, num_kv, group * m, d) * scale
    logits = torch.matmul(q, keys.float().transpose(-1, -2))
    if log_bias is not None:
        logits = logits + log_bias.float()
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if visible is not None:
        probs = probs.nan_to_num(0.0)
    out = torch.matmul(probs, values.float())
    return out.reshape(*lead, num_heads, m, -1), probs.reshape(*lead, num_heads, m, -1)


def select_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[:, index]` of `[H, n, d]` in either storage: `index_select` is fast where each
    position's `d` values are contiguous, advanced indexing where positions are (keys as the
    engine reads them back; 3.4x faster there on an Intel Xeon)."""
    if x.stride(1) == 1 and x.shape[2] > 1:
        return x[:, index]
    return x.index_select(1, index)


def compressed_kv(
    obs: LayerObservation, plan: LayerPlan, kept_values: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's cache after `plan`: (keys, values [Hkv, k + s, d], log_bias [k + s]).

    Kept tokens come first in the order of `plan.keep`, then the summaries, whose bias is
    log(count) (Attention Matching, arXiv 2602.16284) so that a summary of c tokens weighs
    like c tokens. `kept_values` [Hkv, k, d]: the kept tokens' values, where `obs` holds none
    (`KVPolicy.reads_values`).
    """
    keys = select_positions(obs.keys, plan.keep)
    if kept_values is None:
        if obs.values is None:
            raise ValueError("the observation has no values: give the kept tokens' values")
        kept_values = select_positions(obs.values, plan.keep)
    values = kept_values
    bias = torch.zeros(plan.keep.numel(), dtype=torch.float32, device=obs.keys.device)
    if plan.summary_keys is not None and plan.summary_values is not None:
        keys = torch.cat([keys, plan.summary_keys.to(keys.dtype)], dim=1)
        values = torch.cat([values, plan.summary_values.to(values.dtype)], dim=1)
        counts = (
            torch.ones(plan.num_summaries, device=bias.device)
            if plan.summary_counts is None
            else plan.summary_counts.float().to(bias.device)
        )
        bias = torch.cat([bias, counts.log()])
    return keys, values, bias


__all__ = [
    "AttentionStats",
    "CPU_CHUNK_ELEMENTS",
    "DEFAULT_CHUNK_ELEMENTS",
    "GroupReduce",
    "HeadReduce",
    "aggregate_heads",
    "attention_output",
    "attention_probs",
    "attention_stats",
    "attention_stats_batch",
    "check_observation",
    "compressed_kv",
    "last_queries",
    "layer_entropies",
    "prompt_length",
    "reduce_groups",
    "select_positions",
    "stack_layers",
    "stacked_queries",
    "stacks_layers",
]
