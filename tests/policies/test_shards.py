"""Heads split over shards (tensor parallelism, `policies/shards.py`): every shard, planning
from its own heads and the statistics it exchanges, keeps what one process with all heads
keeps, and summarises its own KV heads as that process would.

The shards are threads here, exchanging through `ThreadExchange`; the engine's shards are
vLLM's TP ranks (tests/test_tensor_parallel.py serves them). A shard that plans differently
makes the ranks' reports disagree, which the connector refuses.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from planning_golden import VARIANTS, variant_key

from vllm_entropy_kv.engine.connector import CompressionReports, RanksDisagreeError
from vllm_entropy_kv.engine.worker import CompressionReport, plan_digest
from vllm_entropy_kv.policies import Budget, LayerObservation, LayerPlan, Rope, get_policy
from vllm_entropy_kv.policies.shards import HeadShard


class ThreadExchange:
    """All-gather and all-reduce between `world_size` threads, one view per shard."""

    def __init__(self, world_size: int) -> None:
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.sent: list[int] = []  # elements shard 0 sent, one entry per collective

    def view(self, rank: int) -> _RankExchange:
        return _RankExchange(self, rank)


@dataclasses.dataclass
class _RankExchange:
    shared: ThreadExchange
    rank: int

    def _everyone(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.shared.slots[self.rank] = x.clone()
        self.shared.barrier.wait()
        everyone = [t for t in self.shared.slots if t is not None]
        self.shared.barrier.wait()  # nobody overwrites a slot before all have read it
        if self.rank == 0:
            self.shared.sent.append(x.numel())
        return everyone

    def all_gather(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return torch.cat(self._everyone(input_), dim)

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._everyone(input_)).sum(0)


def _layers(num_layers: int, q_heads: int, kv_heads: int, n: int, window: int,
            offset: int) -> list[LayerObservation]:
    gen = torch.Generator().manual_seed(11)
    d = 16
    return [
        LayerObservation(torch.randn(q_heads, window, d, generator=gen) * (0.5 + layer),
                         torch.randn(kv_heads, n, d, generator=gen),
                         torch.randn(kv_heads, n, d, generator=gen), d**-0.5,
                         query_offset=offset, rope=Rope.from_theta(10000.0, d, 1024))
        for layer in range(num_layers)
    ]


def _shard_of(layers: list[LayerObservation], shard: HeadShard) -> list[LayerObservation]:
    """What TP rank `shard.rank` holds: its slice of the query heads and its KV heads."""
    q_heads = layers[0].queries.shape[0] // shard.world_size
    q = slice(shard.rank * q_heads, (shard.rank + 1) * q_heads)
    return [dataclasses.replace(o, queries=o.queries[q], keys=o.keys[shard.kv_heads],
                                values=o.values[shard.kv_heads], shard=shard)
            for o in layers]


def _plan_sharded(
    name: str, params: dict, layers: list[LayerObservation], budgets: list[Budget]
) -> tuple[list[list[LayerPlan]], list[HeadShard], list[int]]:
    """Every shard's plans, one shard per budget (thread), and what shard 0 sent."""
    world_size = len(budgets)
    exchange = ThreadExchange(world_size)
    total_kv = layers[0].keys.shape[0]
    shards = [HeadShard(exchange.view(r), r, world_size, max(1, total_kv // world_size),
                        total_kv) for r in range(world_size)]
    with ThreadPoolExecutor(world_size) as pool:
        plans = list(pool.map(lambda s: get_policy(name, **params).plan(
            _shard_of(layers, s), budgets[s.rank]), shards))
    return plans, shards, exchange.sent


# 8 query heads, 2 KV heads: 2 shards hold one KV head each; 4 shards hold one KV head
# replicated twice, and half of its GQA group's query heads.
@pytest.mark.parametrize("world_size", [2, 4], ids=["tp2", "tp4-replicated"])
@pytest.mark.parametrize("name,params", VARIANTS, ids=[variant_key(*v) for v in VARIANTS])
def test_every_shard_plans_as_one_process(name: str, params: dict, world_size: int) -> None:
    layers = _layers(num_layers=6, q_heads=8, kv_heads=2, n=400, window=16, offset=3)
    budget = Budget(keep=0.25, sink_tokens=4, recent_tokens=16, block_size=16)
    whole = get_policy(name, **params).plan(layers, budget)
    sharded, shards, sent = _plan_sharded(name, params, layers, [budget] * world_size)
    for shard, plans in zip(shards, sharded):
        for i, (got, want) in enumerate(zip(plans, whole)):
            where = f"{name} shard {shard.rank} layer {i}"
            assert torch.equal(got.keep, want.keep), f"{where}: kept tokens differ"
            if want.layer_entropy is None:
                assert got.layer_entropy is None
            else:
                assert got.layer_entropy == pytest.approx(want.layer_entropy, abs=1e-6)
            assert got.num_summaries == want.num_summaries, where
            if want.summary_keys is None:
                continue
            assert torch.equal(got.summary_counts, want.summary_counts), where
            for part in ("summary_keys", "summary_values"):
                torch.testing.assert_close(getattr(got, part),
                                           getattr(want, part)[shard.kv_heads],
                                           atol=1e-4, rtol=1e-4, msg=f"{where}: {part}")
    # Position-only policies exchange nothing; scoring policies exchange statistics.
    assert (not sent) == (get_policy(name, **params).observation_queries == 0)


def test_shards_exchange_scores_not_keys() -> None:
    """What crosses shards for `entropy`: each query head's scores over prompt positions
    and its entropy, nothing of the keys and values."""
    layers = _layers(num_layers=4, q_heads=8, kv_heads=2, n=2000, window=16, offset=0)
    budget = Budget(keep=0.25, block_size=16)
    *_, sent = _plan_sharded("entropy", {}, layers, [budget] * 2)
    # [L, Hq/2, n] scores and [L, Hq/2] entropies.
    assert sent == [4 * 4 * 2000, 4 * 4]


def test_a_shard_that_plans_differently_stops_the_engine() -> None:
    """If one rank ever planned differently (here: another budget), the reports of the
    ranks disagree and the connector refuses them before any block is freed."""
    layers = _layers(num_layers=4, q_heads=8, kv_heads=2, n=400, window=16, offset=0)
    plans, _, _ = _plan_sharded("entropy", {}, layers, [Budget(keep=0.25, block_size=16),
                                                         Budget(keep=0.5, block_size=16)])
    reports = [
        CompressionReports({"req": CompressionReport(
            "entropy", 400, {i: p.num_physical for i, p in enumerate(rank_plans)},
            {i: [] for i in range(len(rank_plans))}, 0.0,
            plan_digest=plan_digest(rank_plans))})
        for rank_plans in plans
    ]
    with pytest.raises(RanksDisagreeError, match="'req'"):
        reports[0].aggregate(reports[1])
