"""The shared keep set: exactly k sorted unique indices, sinks and recent tokens included."""

from __future__ import annotations

import pytest
import torch

from vllm_entropy_kv.policies.selection import complement, forced_mask, select_tokens


@pytest.mark.parametrize("k", [8, 9, 20, 50, 99])
def test_exact_sorted_unique_with_sinks_and_recent(k: int) -> None:
    scores = torch.randn(100, generator=torch.Generator().manual_seed(k))
    keep = select_tokens(scores, k, sink_tokens=4, recent_tokens=4)
    assert keep.dtype == torch.int64 and keep.numel() == k
    assert bool((keep[1:] > keep[:-1]).all())
    assert {0, 1, 2, 3, 96, 97, 98, 99} <= set(keep.tolist())
    # The rest are the best-scoring of the other tokens.
    others = torch.arange(4, 96)
    best = others[torch.topk(scores[4:96], k - 8).indices]
    assert set(best.tolist()) <= set(keep.tolist())


def test_keep_everything_and_nothing() -> None:
    scores = torch.rand(10)
    assert select_tokens(scores, 10, 4, 4).tolist() == list(range(10))
    assert select_tokens(scores, 25, 4, 4).tolist() == list(range(10))
    assert select_tokens(scores, 0, 4, 4).numel() == 0


def test_tiny_budget_prefers_recent_then_sinks() -> None:
    scores = torch.zeros(20)
    assert select_tokens(scores, 3, 4, 4).tolist() == [17, 18, 19]
    assert select_tokens(scores, 6, 4, 4).tolist() == [0, 1, 16, 17, 18, 19]


def test_overlapping_sinks_and_recent() -> None:
    keep = select_tokens(torch.rand(6), 5, 4, 4)
    assert keep.numel() == 5 and keep.unique().numel() == 5


def test_nan_and_inf_scores() -> None:
    scores = torch.arange(30, dtype=torch.float32)
    scores[10] = float("nan")
    scores[11] = float("-inf")
    scores[12] = float("inf")
    keep = select_tokens(scores, 27, 2, 2)
    assert keep.numel() == 27 and keep.unique().numel() == 27
    assert 12 in keep.tolist()
    assert 10 not in select_tokens(scores, 10, 2, 2).tolist()


def test_helpers() -> None:
    assert forced_mask(10, 2, 3).nonzero().squeeze(1).tolist() == [0, 1, 7, 8, 9]
    assert forced_mask(10, 0, 0).sum() == 0
    assert complement(torch.tensor([0, 3, 4]), 6).tolist() == [1, 2, 5]
