"""Expected Attention: keys scored by the attention that future queries are expected to pay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_entropy_kv.policies.base import LayerObservation, Rope
from vllm_entropy_kv.policies.registry import register_policy
from vllm_entropy_kv.policies.selection import LayerScores, ScorerPolicy, chunk_scores
from vllm_entropy_kv.policies.stats import (
    GroupReduce,
    HeadReduce,
    aggregate_heads,
    last_queries,
    reduce_groups,
)


def averaged_rotation(rope: Rope, num_queries: int, future_positions: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines ([M, r/2]) of the rotation that moves each of the last M prompt
    queries to the next `future_positions` positions after the prompt, averaged over them:
    query j (M - j positions before the first future one) turns by M - j + t, t < T."""
    offsets = (num_queries - torch.arange(num_queries).unsqueeze(1)
               + torch.arange(future_positions).unsqueeze(0))
    if int(offsets.max()) >= rope.max_offset:
        raise ValueError(f"RoPE table covers offsets below {rope.max_offset}, but "
                         f"{num_queries} queries and {future_positions} future positions reach "
                         f"{int(offsets.max())}")
    return rope.cos[offsets].mean(1), rope.sin[offsets].mean(1)


@register_policy
@dataclass
class ExpectedAttentionPolicy(ScorerPolicy):
    """Expected Attention (Devoto et al. 2025, "Expected Attention: KV Cache Compression by
    Estimating Attention from Future Queries' Distribution"; kvpress's ExpectedAttentionPress),
    with one token set per layer. Future queries are modelled as a Gaussian: every window query
    is moved by the model's RoPE to the next `future_positions` positions (the rotation
    averaged over them), and the moved queries' mean mu and covariance S give each key its
    expected attention logit, scale * mu.k + scale^2 / 2 * k.S.k; a softmax over the prompt,
    times the value's norm, averaged over each GQA group and then the layer's KV heads, scores
    the key. Uniform layer budgets; sinks and recent tokens as the `Budget` says.

    Unlike kvpress, which estimates the query distribution from every prompt position, the
    statistics come from the observation window's queries (the engine keeps no others), and
    keys are scored per layer rather than per head. Needs `LayerObservation.rope`; offline
    only for now (the engine does not pass the model's RoPE). With head shards (tensor
    parallelism) each shard scores its own KV heads and the shards exchange those scores.

    observation_queries: the window queries that estimate the distribution.
    future_positions: how many positions after the prompt the expectation covers (kvpress 512).
    use_covariance: add the covariance term (kvpress: on).
    use_vnorm: multiply each head's expected attention by the value norm (kvpress: on).
    chunk_size: tokens kept or dropped in chunks of this many positions (1: per token, as
        kvpress).
    group_reduce, head_reduce: how query heads, then KV heads, combine (`aggregate_heads`).
    """

    name: ClassVar[str] = "expected-attention"
    reads_values: ClassVar[bool] = True
    observation_queries: int | None = 32
    future_positions: int = 512
    use_covariance: bool = True
    use_vnorm: bool = True
    chunk_size: int = 1
    group_reduce: GroupReduce = "mean"
    head_reduce: HeadReduce = "mean"

    def score(self, layers: list[LayerObservation]) -> LayerScores:
        tokens = torch.stack([self.layer_scores(obs) for obs in layers])
        return LayerScores(chunk_scores(tokens, self.chunk_size))

    def layer_scores(self, obs: LayerObservation) -> torch.Tensor:
        """[n]: one layer's expected attention per key (`plan` has validated `obs`)."""
        if obs.rope is None:
            raise ValueError(f"{self.name} needs the model's RoPE (LayerObservation.rope)")
        queries = last_queries(obs, self.observation_queries).float()  # [Hq, M, d]
        if obs.shard is not None:
            # The query heads of this shard's KV heads' groups (gathered where KV heads are
            # replicated over shards).
            queries = obs.shard.own_group_queries(queries, 0)
        cos, sin = averaged_rotation(obs.rope, queries.shape[1], self.future_positions)
        moved = obs.rope.rotate(queries, cos, sin)
        num_kv = obs.keys.shape[0]
        keys = obs.keys.float()  # [Hkv, n, d]
        grouped = moved.unflatten(0, (num_kv, -1))  # [Hkv, g, M, d]
        mean = grouped.mean(2)  # [Hkv, g, d]
        logits = obs.scale * torch.einsum("kgd,knd->kgn", mean, keys)
        if self.use_covariance and moved.shape[1] > 1:
            # k.S.k with S the moved queries' covariance: the mean square of their centred
            # projections on k.
            centred = grouped - mean.unsqueeze(2)
            spread = torch.einsum("kgmd,knd->kgmn", centred, keys).square().mean(2)
            logits = logits + obs.scale**2 / 2 * spread
        expected = logits.softmax(-1).flatten(0, 1)  # [Hq, n]
        kv_scores = reduce_groups(expected, num_kv, self.group_reduce)  # [Hkv, n]
        if self.use_vnorm:
            kv_scores = kv_scores * obs.values.float().norm(dim=-1)
        if obs.shard is not None:
            kv_scores = obs.shard.gather_kv_heads(kv_scores, 0)
            num_kv = kv_scores.shape[0]
        # Each KV head is its own group of one: only the reduction over KV heads remains.
        return aggregate_heads(kv_scores, num_kv, "mean", self.head_reduce)
