"""Tensor parallelism without a server: the head bookkeeping of a TP rank's `HeadShard`
(engine/parallel.py; tests/policies/test_shards.py plans with shards), and the connector's
check that every rank reports the same plans before any block is freed."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from vllm_entropy_kv.engine.connector import CompressionReports, RanksDisagreeError
from vllm_entropy_kv.engine.parallel import head_shard
from vllm_entropy_kv.engine.worker import CompressionReport


def report(kept_tokens: int, digest: str) -> CompressionReport:
    return CompressionReport("entropy", 256, {0: kept_tokens}, {0: []}, 0.1, plan_digest=digest)


def test_ranks_that_agree_are_merged() -> None:
    ranks = [CompressionReports({"a": report(64, "d1"), "b": report(32, "d2")})
             for _ in range(3)]
    merged = ranks[0].aggregate(ranks[1]).aggregate(ranks[2])
    assert merged.reports.keys() == {"a", "b"}


@pytest.mark.parametrize("other", [
    CompressionReports({"a": report(96, "d9")}),  # another plan
    CompressionReports({}),  # one rank did not compress it
], ids=["different-plan", "missing-report"])
def test_ranks_that_disagree_stop_the_engine(other: CompressionReports) -> None:
    mine = CompressionReports({"a": report(64, "d1")})
    with pytest.raises(RanksDisagreeError, match="'a'"):
        mine.aggregate(other)
    with pytest.raises(RanksDisagreeError):
        other.aggregate(mine)


@dataclass
class FakeTPGroup:
    """The parts of vLLM's GroupCoordinator a `HeadShard` uses; `all_gather` returns every
    rank's tensor filled with that rank's number."""

    rank_in_group: int
    world_size: int

    def all_gather(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return torch.cat([torch.full_like(input_, r) for r in range(self.world_size)], dim)

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        return input_ * self.world_size


def test_replicated_kv_heads_are_exchanged_once() -> None:
    # 2 KV heads on 4 ranks: ranks 0-1 hold head 0, ranks 2-3 head 1.
    shards = [head_shard(FakeTPGroup(rank, 4), 1, 2) for rank in range(4)]
    assert [s.first_kv_head for s in shards] == [0, 0, 1, 1]
    assert [s.kv_heads for s in shards] == [slice(0, 1), slice(0, 1), slice(1, 2), slice(1, 2)]
    coords = torch.zeros(5, 1, 7)  # [L, Hkv of a rank, ...]
    assert shards[0].gather_kv_heads(coords, dim=1)[0, :, 0].tolist() == [0, 2]
    assert shards[0].gather_query_heads(coords, dim=1).shape == (5, 4, 7)


def test_without_replicas_a_rank_holds_its_groups_queries() -> None:
    shard = head_shard(FakeTPGroup(1, 3), 1, 3)
    queries = torch.ones(2, 3, 16, 8)  # [L, Hq of a rank, W, d]
    assert shard.own_group_queries(queries, dim=1) is queries
    assert shard.gather_kv_heads(queries, dim=1).shape == (2, 9, 16, 8)
