"""EntropyMerge: summaries keep the mass of the tokens they replace (log(count) bias)."""

from __future__ import annotations

import pytest
import torch

from vllm_entropy_kv.policies import Budget, LayerObservation, get_policy
from vllm_entropy_kv.policies.entropy_merge import contiguous_groups, merge_groups, summary_slots
from vllm_entropy_kv.policies.selection import complement
from vllm_entropy_kv.policies.stats import attention_output, compressed_kv

HOT = [10, 20, 30, 40]


def two_kinds_of_tokens(n: int = 64, d: int = 8, seed: int = 0) -> LayerObservation:
    """A few hot tokens with distinct keys; every other token shares one key per KV head."""
    gen = torch.Generator().manual_seed(seed)
    cold = torch.randn(2, 1, d, generator=gen) * 0.3
    keys = cold.expand(2, n, d).clone()
    keys[:, HOT] = torch.randn(2, len(HOT), d, generator=gen) * 0.3
    queries = torch.randn(4, 8, d, generator=gen)
    queries[..., :] += keys[:, HOT].mean((0, 1)) * 10  # the window looks at the hot tokens
    return LayerObservation(queries, keys, torch.randn(2, n, d, generator=gen), d**-0.5)


def test_merged_attention_equals_full_attention() -> None:
    obs = two_kinds_of_tokens()
    # recent >= window: every dropped token is seen by every window query, so tokens with
    # equal keys also get equal mass (the merge weights).
    budget = Budget(keep=20, sink_tokens=2, recent_tokens=8, block_size=1)
    merge = get_policy("entropy-merge", summary_fraction=0.25, chunk_size=1, reach=1)
    plan = merge.plan([obs], budget)[0]
    assert plan.num_summaries == 5 and plan.num_physical == 20
    assert set(HOT) <= set(plan.keep.tolist())
    dropped = complement(plan.keep, 64)
    assert int(plan.summary_counts.sum()) == dropped.numel() == 49

    # Fresh queries (decode steps): same mass on the summaries as on the originals, and the
    # same attention output, because the merged keys are identical and carry log(count).
    queries = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(9)) * 3
    full_out, full_probs = attention_output(queries, obs.keys, obs.values, obs.scale)
    keys, values, bias = compressed_kv(obs, plan)
    out, probs = attention_output(queries, keys, values, obs.scale, bias)
    torch.testing.assert_close(
        probs[..., plan.keep.numel():].sum(-1), full_probs[..., dropped].sum(-1)
    )
    torch.testing.assert_close(out, full_out, atol=1e-5, rtol=1e-5)

    # Without the bias a summary weighs like one token and the mass is lost.
    _, unbiased = attention_output(queries, keys, values, obs.scale)
    assert float(unbiased[..., plan.keep.numel():].sum(-1).mean()) < float(
        full_probs[..., dropped].sum(-1).mean()
    ) / 2


def test_merge_groups_weighted_means() -> None:
    keys = torch.tensor([[[1.0], [3.0], [10.0], [20.0], [30.0]]])
    values = keys * 2
    weights = torch.tensor([[1.0, 3.0, 1.0, 1.0, 2.0]])
    k, v, counts = merge_groups(keys, values, weights, torch.tensor([0, 0, 1, 1, 1]), 2)
    torch.testing.assert_close(k[0, :, 0], torch.tensor([2.5, 22.5]))
    torch.testing.assert_close(v, 2 * k)
    assert counts.tolist() == [2, 3] and counts.dtype == torch.int64
    # Nobody attends to a group: plain mean.
    k, _, _ = merge_groups(keys, values, torch.zeros(1, 5), torch.tensor([0, 0, 1, 1, 1]), 2)
    torch.testing.assert_close(k[0, :, 0], torch.tensor([2.0, 20.0]))


def test_groups_are_contiguous_runs() -> None:
    ids = contiguous_groups(10, 3)
    assert ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert contiguous_groups(5, 5).tolist() == [0, 1, 2, 3, 4]


def test_summary_slots() -> None:
    budget = Budget(keep=0.5, sink_tokens=4, recent_tokens=16)
    assert summary_slots(100, 400, 0.1, budget) == 10
    assert summary_slots(100, 400, 0.0, budget) == 0
    assert summary_slots(400, 400, 0.1, budget) == 0  # nothing dropped
    assert summary_slots(22, 400, 0.5, budget) == 2  # never eats sinks + recent
    assert summary_slots(20, 400, 0.5, budget) == 0
    assert summary_slots(30, 400, 0.01, budget) == 1  # at least one when anything is dropped


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_budget_split_between_kept_and_summaries(make_layers, fraction: float) -> None:
    layers = make_layers(num_layers=4, n=500)
    budget = Budget(keep=0.2, sink_tokens=4, recent_tokens=16, block_size=16)
    merge = get_policy("entropy-merge", summary_fraction=fraction).plan(layers, budget)
    plain = get_policy("entropy").plan(layers, budget)
    for m, p in zip(merge, plain):
        assert m.num_physical == p.num_physical  # same entropy budgets
        assert m.num_summaries == max(1, round(fraction * p.num_physical))
        assert int(m.summary_counts.sum()) == 500 - m.keep.numel()
        assert int(m.summary_counts.max() - m.summary_counts.min()) <= 1
