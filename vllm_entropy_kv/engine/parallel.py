"""Tensor parallelism: every rank of a TP group keeps the same tokens.

A TP rank holds the query and KV heads of its shard, so a policy run on one rank's heads
alone would see a fraction of the evidence, and two ranks could keep different token sets
(and different numbers of blocks) in one layer. The scheduler frees one block range per
layer for all ranks; a rank that kept more would then read blocks handed to another request.

So each rank plans from its own heads' observations with a `HeadShard` whose exchange is
vLLM's TP group coordinator (its `all_gather` and `all_reduce`, shared memory on CPU): the
policies exchange per-head statistics over prompt positions (policies/shards.py), after
which every rank holds the statistics of all heads and computes the same budgets and kept
indices, and the summaries of its own heads. The connector checks that the reports of all
ranks agree before any block is freed (`CompressionReports.aggregate`).
"""

from __future__ import annotations

from typing import Any

from vllm_entropy_kv.policies.shards import HeadShard


def tensor_parallel_group() -> Any | None:
    """vLLM's TP group coordinator, or None without tensor parallelism (or outside an
    engine: tests drive the worker directly)."""
    from vllm.distributed import get_tp_group, model_parallel_is_initialized

    if not model_parallel_is_initialized():
        return None
    group = get_tp_group()
    return group if group.world_size > 1 else None


def head_shard(group: Any, num_kv_heads: int, total_kv_heads: int) -> HeadShard:
    """This rank's share of the heads in `group` (vLLM's TP group coordinator), holding
    `num_kv_heads` of the model's `total_kv_heads`."""
    return HeadShard(group, group.rank_in_group, group.world_size, num_kv_heads,
                     total_kv_heads)
