"""Tensor parallelism without a server: the head bookkeeping of `engine/parallel.py`, and the
connector's check that every rank reports the same plans before any block is freed."""

from __future__ import annotations

import pytest
import torch

from vllm_entropy_kv.engine.connector import CompressionReports, RanksDisagreeError
from vllm_entropy_kv.engine.parallel import TensorParallelShard, _heads_of, _own_heads
from vllm_entropy_kv.engine.worker import CompressionReport
from vllm_entropy_kv.policies import LayerPlan


def report(freed: tuple[int, int], digest: str) -> CompressionReport:
    return CompressionReport("entropy", 256, {0: 64}, {0: freed}, 0.1, plan_digest=digest)


def test_ranks_that_agree_are_merged() -> None:
    ranks = [CompressionReports({"a": report((2, 8), "d1"), "b": report((1, 8), "d2")})
             for _ in range(3)]
    merged = ranks[0].aggregate(ranks[1]).aggregate(ranks[2])
    assert merged.reports.keys() == {"a", "b"}


@pytest.mark.parametrize("other", [
    CompressionReports({"a": report((3, 8), "d9")}),  # another plan
    CompressionReports({}),  # one rank did not compress it
], ids=["different-plan", "missing-report"])
def test_ranks_that_disagree_stop_the_engine(other: CompressionReports) -> None:
    mine = CompressionReports({"a": report((2, 8), "d1")})
    with pytest.raises(RanksDisagreeError, match="'a'"):
        mine.aggregate(other)
    with pytest.raises(RanksDisagreeError):
        other.aggregate(mine)


def test_replicated_kv_heads_are_planned_once() -> None:
    # 2 KV heads on 4 ranks: ranks 0-1 hold head 0, ranks 2-3 head 1.
    shards = [TensorParallelShard(rank, 4, 1, 2) for rank in range(4)]
    assert [s.first_kv_head for s in shards] == [0, 0, 1, 1]
    assert shards[0].distinct_ranks() == [0, 2]
    gathered = torch.arange(4).view(4, 1, 1)  # one head from each rank, tagged by rank
    assert _heads_of(gathered, [0, 2], 4).flatten().tolist() == [0, 2]
    assert _heads_of(gathered, [0, 1, 2, 3], 4) is gathered


def test_each_rank_keeps_its_own_heads_of_the_summaries() -> None:
    summary = torch.arange(3).view(3, 1, 1).expand(3, 2, 4).float()  # [Hkv=3, s, d]
    plan = LayerPlan(torch.arange(4), summary, summary + 10, torch.ones(2))
    for rank in range(3):
        own = _own_heads(plan, TensorParallelShard(rank, 3, 1, 3))
        assert own.summary_keys.shape == (1, 2, 4)
        assert own.summary_keys.unique().tolist() == [rank]
        assert own.summary_values.unique().tolist() == [rank + 10]
        assert torch.equal(own.keep, plan.keep)
