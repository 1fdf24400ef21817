"""Tensor parallelism: every rank of a TP group keeps the same tokens.

A TP rank holds the query and KV heads of its shard, so a policy run on one rank's heads
would see a fraction of the evidence, and two ranks could keep different token sets (and
different numbers of blocks) in one layer. The scheduler frees one block range per layer for
all ranks; a rank that kept more would then read blocks handed to another request.

So planning runs once per request, on the first rank of the TP group, over every head:
each rank sends it its observations (window queries, prompt keys and values of its heads,
all layers stacked: one `gather` per tensor through vLLM's TP communicator), it plans as a
TP=1 server would, and broadcasts the plans; each rank then writes the same kept tokens and
its own heads' share of the summaries. One plan instead of one per rank also keeps a
2-core machine from planning three times at once. The connector checks that the reports of
all ranks agree before any block is freed (`CompressionReports.aggregate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from vllm_entropy_kv.policies import LayerObservation, LayerPlan


@dataclasses.dataclass(frozen=True)
class TensorParallelShard:
    """Which heads this rank holds: `num_kv_heads` of the model's `total_kv_heads`, and the
    rank's position in its TP group of `world_size`."""

    rank: int
    world_size: int
    num_kv_heads: int
    total_kv_heads: int

    @property
    def replicas(self) -> int:
        """Ranks holding each KV head (vLLM replicates KV heads when there are fewer than
        ranks)."""
        return max(1, self.world_size // self.total_kv_heads)

    @property
    def first_kv_head(self) -> int:
        return self.rank // self.replicas * self.num_kv_heads

    def distinct_ranks(self) -> list[int]:
        """One rank per distinct set of KV heads, in head order."""
        return list(range(0, self.world_size, self.replicas))


def tensor_parallel_group() -> Any | None:
    """vLLM's TP group coordinator, or None without tensor parallelism (or outside an
    engine: tests drive the worker directly)."""
    from vllm.distributed import get_tp_group, model_parallel_is_initialized

    if not model_parallel_is_initialized():
        return None
    group = get_tp_group()
    return group if group.world_size > 1 else None


def plan_on_all_heads(
    plan: Callable[[list[LayerObservation]], list[LayerPlan]],
    observations: list[LayerObservation],
    group: Any,
    total_kv_heads: int,
) -> list[LayerPlan]:
    """Every rank calls this with its own heads' observations, in the same order; all get
    the plans the first rank makes over all heads, with summaries cut to their own heads."""
    shard = TensorParallelShard(group.rank_in_group, group.world_size,
                                observations[0].keys.shape[0], total_kv_heads)
    queries = group.gather(torch.stack([o.queries for o in observations]), dst=0, dim=1)
    keys = group.gather(torch.stack([o.keys for o in observations]), dst=0, dim=1)
    values = group.gather(torch.stack([o.values for o in observations]), dst=0, dim=1)
    plans = None
    if shard.rank == 0:
        distinct = shard.distinct_ranks()
        plans = plan([
            dataclasses.replace(
                observation,
                queries=queries[i],  # query heads are never replicated
                keys=_heads_of(keys[i], distinct, shard.world_size),
                values=_heads_of(values[i], distinct, shard.world_size),
            )
            for i, observation in enumerate(observations)
        ])
    plans = group.broadcast_object(plans, src=0)
    return [_own_heads(p, shard) for p in plans]


def _heads_of(gathered: torch.Tensor, ranks: list[int], world_size: int) -> torch.Tensor:
    """The heads of `ranks` from a gather of every rank's heads along dim 0."""
    per_rank = gathered.shape[0] // world_size
    if len(ranks) == world_size:
        return gathered
    return torch.cat([gathered[r * per_rank : (r + 1) * per_rank] for r in ranks])


def _own_heads(plan: LayerPlan, shard: TensorParallelShard) -> LayerPlan:
    if plan.summary_keys is None:
        return plan
    heads = slice(shard.first_kv_head, shard.first_kv_head + shard.num_kv_heads)
    return dataclasses.replace(plan, summary_keys=plan.summary_keys[heads],
                               summary_values=plan.summary_values[heads])
