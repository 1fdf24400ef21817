"""Heads split over processes (tensor parallelism): what the shards exchange to plan alike.

With tensor parallelism each process holds a slice of every layer's query and KV heads, but
a layer keeps one token set for all of its heads, so every shard must plan from the evidence
of all heads, and all must keep the same tokens. A `HeadShard` on the observations says
which heads this process holds and how to reach the others. The policies then exchange
per-head statistics over prompt positions only, never keys, values or attention matrices:

- `attention_stats_batch`: each query head's key scores [L, Hq, n] and entropies [L, Hq]
  (all-gathered), and SRC's per-key sums of p log p [L, n] (all-reduced);
- SRC: its bin keys' coordinates [L, Hkv, b, r], which k-means clusters over all KV heads,
  and, where KV heads are replicated, the window queries of its KV heads' GQA groups.

After the exchange every shard holds the statistics a single process would have computed
over all heads, so it computes the same budgets and kept indices, and the summary tokens of
its own KV heads. Nothing here imports vLLM: the engine passes vLLM's TP group
coordinator, whose `all_gather` and `all_reduce` are the `HeadExchange` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class HeadExchange(Protocol):
    """Collectives over the shards of one model, called by all of them in the same order."""

    def all_gather(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every shard's tensor, concatenated along `dim` in shard order."""

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        """The sum of every shard's tensor."""


@dataclass(frozen=True)
class HeadShard:
    """This process's share of the heads: shard `rank` of `world_size`, holding
    `num_kv_heads` of the model's `total_kv_heads` KV heads and `1 / world_size` of its query
    heads (vLLM's split: query heads are never replicated; KV heads are when there are fewer
    of them than shards)."""

    exchange: HeadExchange
    rank: int
    world_size: int
    num_kv_heads: int
    total_kv_heads: int

    @property
    def replicas(self) -> int:
        """Shards holding each KV head."""
        return max(1, self.world_size // self.total_kv_heads)

    @property
    def first_kv_head(self) -> int:
        return self.rank // self.replicas * self.num_kv_heads

    @property
    def kv_heads(self) -> slice:
        """This shard's KV heads among all of them."""
        return slice(self.first_kv_head, self.first_kv_head + self.num_kv_heads)

    def gather_query_heads(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every shard's per-query-head tensor, all query heads in model order along `dim`."""
        return self.exchange.all_gather(x.contiguous(), dim)

    def gather_kv_heads(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every shard's per-KV-head tensor, each KV head once, in model order along `dim`."""
        gathered = self.exchange.all_gather(x.contiguous(), dim)
        if self.replicas == 1:
            return gathered
        per_shard = x.shape[dim]
        return torch.cat([gathered.narrow(dim, r * per_shard, per_shard)
                          for r in range(0, self.world_size, self.replicas)], dim)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over shards (`x` itself is left as it was: vLLM's CPU all-reduce works
        in place)."""
        return self.exchange.all_reduce(x.clone())

    def own_group_queries(self, queries: torch.Tensor, dim: int) -> torch.Tensor:
        """The query heads of this shard's KV heads' GQA groups, from this shard's query
        heads along `dim`: its own where KV heads are not replicated, else gathered (a
        replica holds only part of its KV head's group)."""
        if self.replicas == 1:
            return queries
        every = self.gather_query_heads(queries, dim)
        group = every.shape[dim] // self.total_kv_heads
        return every.narrow(dim, self.first_kv_head * group, self.num_kv_heads * group)


__all__ = ["HeadExchange", "HeadShard"]
