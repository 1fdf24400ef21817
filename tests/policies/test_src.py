"""SRC: least squares reconstruction, low-rank compression, synthetic tokens, accounting."""

from __future__ import annotations

import pytest
import torch

from vllm_entropy_kv.policies import Budget, LayerPlan, get_policy
from vllm_entropy_kv.policies.budgets import uniform_budgets
from vllm_entropy_kv.policies.selection import complement
from vllm_entropy_kv.policies.src import (
    bin_attention,
    cluster,
    fair_effective_budget,
    group_queries,
    low_rank,
    plan_accounting,
    real_bytes,
    reconstruction_operator,
    summarize_bin,
)
from vllm_entropy_kv.policies.stats import attention_output

GEN = torch.Generator().manual_seed(0)


def test_least_squares_exact_when_rank_suffices() -> None:
    """m <= d reference queries (full row rank): rank m reproduces the bin output exactly."""
    d, m = 16, 6
    q = torch.randn(2, m, d, generator=GEN)
    kb, vb = torch.randn(2, 30, d, generator=GEN), torch.randn(2, 30, d, generator=GEN)
    _, out = bin_attention(q, kb, vb, d**-0.5)
    w = reconstruction_operator(q, out)
    torch.testing.assert_close(q @ w, out, atol=1e-4, rtol=1e-4)
    u, s, vh = low_rank(w, m)
    torch.testing.assert_close(q @ (u * s.unsqueeze(1)) @ vh, out, atol=1e-4, rtol=1e-4)
    u, s, vh = low_rank(w, 2)  # too small a rank: a visible residual
    assert float((q @ (u * s.unsqueeze(1)) @ vh - out).abs().max()) > 1e-2


def test_least_squares_recovers_a_low_rank_map() -> None:
    d, m = 8, 40
    q = torch.randn(1, m, d, generator=GEN)
    w_true = torch.randn(1, d, 2, generator=GEN) @ torch.randn(1, 2, d, generator=GEN)
    w = reconstruction_operator(q, q @ w_true)
    torch.testing.assert_close(w, w_true, atol=1e-4, rtol=1e-4)
    u, s, vh = low_rank(w, 2)
    torch.testing.assert_close((u * s.unsqueeze(1)) @ vh, w_true, atol=1e-4, rtol=1e-4)


def test_synthetic_tokens_exact_for_a_bin_of_rank_distinct_keys() -> None:
    """A bin of 4 distinct keys (10 copies each) becomes 4 synthetic tokens that reproduce
    the bin's attention output and mass for the reference queries and for fresh ones."""
    d, rank = 16, 4
    distinct = torch.randn(2, rank, d, generator=GEN)
    perm = torch.randperm(40, generator=GEN)
    kb = distinct[:, perm % rank]
    vb = torch.randn(2, 40, d, generator=GEN)
    queries = torch.randn(4, 8, d, generator=GEN)
    keys, values, counts = summarize_bin(queries, kb, vb, d**-0.5, rank)
    assert sorted(counts.tolist()) == [10, 10, 10, 10]
    fresh = torch.randn(4, 5, d, generator=GEN)
    for q in (queries, fresh):
        ref_out, _ = attention_output(q, kb, vb, d**-0.5)
        out, _ = attention_output(q, keys, values, d**-0.5, counts.float().log())
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
        # Mass: sum of exp(scores) over the bin == over the synthetic tokens with log(count).
        scores = group_queries(q, 2) @ kb.transpose(1, 2) * d**-0.5
        synth = group_queries(q, 2) @ keys.transpose(1, 2) * d**-0.5 + counts.float().log()
        torch.testing.assert_close(synth.logsumexp(-1), scores.logsumexp(-1), atol=1e-4, rtol=1e-4)


def test_no_mask_equals_a_mask_that_shows_every_token() -> None:
    """The policy skips the causal mask when its recent tokens cover the window (every window
    query sees the whole bin); that is bit for bit the masked computation."""
    d = 16
    kb, vb = torch.randn(2, 60, d, generator=GEN), torch.randn(2, 60, d, generator=GEN)
    queries = torch.randn(4, 8, d, generator=GEN)
    masked = summarize_bin(queries, kb, vb, d**-0.5, 4,
                           visible=torch.ones(8, 60, dtype=torch.bool))
    for want, got in zip(masked, summarize_bin(queries, kb, vb, d**-0.5, 4)):
        assert torch.equal(want, got)


def test_plans_summarised_a_few_layers_at_a_time_equal_all_at_once(make_layers,
                                                                    monkeypatch) -> None:
    """On a CPU the bins are summarised two layers per step, on a GPU all together: same
    plans, with the causal mask (recent tokens shorter than the window) and without."""
    from vllm_entropy_kv.policies import src

    layers = make_layers(num_layers=5, n=300)
    for recent in (16, 32):
        budget = Budget(keep=0.25, sink_tokens=4, recent_tokens=recent, block_size=16)
        per_step = get_policy("src").plan(layers, budget)
        with monkeypatch.context() as m:
            m.setattr(src, "stacks_layers", lambda device: True)
            together = get_policy("src").plan(layers, budget)
        for a, b in zip(per_step, together):
            assert torch.equal(a.keep, b.keep) and torch.equal(a.summary_counts, b.summary_counts)
            assert torch.equal(a.summary_keys, b.summary_keys)
            assert torch.equal(a.summary_values, b.summary_values)


def test_value_fit_beats_plain_merge_on_reference_queries() -> None:
    d = 16
    kb, vb = torch.randn(2, 200, d, generator=GEN), torch.randn(2, 200, d, generator=GEN)
    queries = torch.randn(4, 16, d, generator=GEN)
    ref_out, _ = attention_output(queries, kb, vb, d**-0.5)

    def error(ridge: float) -> float:
        keys, values, counts = summarize_bin(queries, kb, vb, d**-0.5, 8, value_ridge=ridge)
        out, _ = attention_output(queries, keys, values, d**-0.5, counts.float().log())
        return float((out - ref_out).square().mean())

    assert error(1e-3) < error(1e6)  # 1e6: the values stay the plain merged means


def test_cluster_is_deterministic_and_never_empty() -> None:
    feats = torch.randn(50, 3, generator=GEN)
    a, b = cluster(feats, 6), cluster(feats, 6)
    assert torch.equal(a, b)
    assert torch.bincount(a, minlength=6).min() >= 1
    same = torch.zeros(10, 2)  # all points equal: still r non-empty groups
    assert torch.bincount(cluster(same, 4), minlength=4).min() >= 1
    assert sorted(cluster(torch.randn(3, 2), 3).tolist()) == [0, 1, 2]


def test_policy_bins_high_entropy_tokens(make_layers) -> None:
    layers = make_layers(num_layers=3, n=400)
    budget = Budget(keep=0.25, sink_tokens=4, recent_tokens=16, block_size=16)
    policy = get_policy("src", rank=8, bin_fraction=0.5)
    budgets = uniform_budgets(budget, 400, 3)
    for k, plan in zip(budgets, policy.plan(layers, budget)):
        assert plan.num_summaries == 8 and plan.num_physical == k
        dropped = complement(plan.keep, 400).numel()
        assert int(plan.summary_counts.sum()) == -(-dropped // 2)  # half the dropped tokens
    full = get_policy("src", bin_fraction=1.0).plan(layers, budget)
    assert all(int(p.summary_counts.sum()) == 400 - p.keep.numel() for p in full)


def test_rank_shrinks_to_fit_the_budget(make_layers) -> None:
    layers = make_layers(num_layers=1, n=400)
    budget = Budget(keep=24, sink_tokens=4, recent_tokens=16, block_size=1)
    plan = get_policy("src", rank=8).plan(layers, budget)[0]
    assert plan.num_summaries == 4 and plan.num_physical == 24


@pytest.mark.parametrize("allocation", ["uniform", "entropy", "pyramid"])
def test_allocations(make_layers, allocation: str) -> None:
    layers = make_layers(num_layers=4, n=400)
    budget = Budget(keep=0.25, sink_tokens=4, recent_tokens=16, block_size=16)
    plans = get_policy("src", allocation=allocation).plan(layers, budget)
    assert sum(p.num_physical for p in plans) == 400


def test_fair_and_real_accounting() -> None:
    assert fair_effective_budget(100, 30, 8) == 78
    plan = LayerPlan(
        keep=torch.arange(10),
        summary_keys=torch.zeros(2, 2, 16),
        summary_values=torch.zeros(2, 2, 16),
        summary_counts=torch.tensor([5, 7]),
    )
    acc = plan_accounting(plan)
    assert (acc.kept, acc.bin_size, acc.rank, acc.nominal) == (10, 12, 2, 22)
    assert acc.effective == plan.num_physical == 12
    # 12 tokens x (K + V) x 2 heads x 16 dims x 2 bytes + 2 biases x 4 bytes.
    assert real_bytes(plan, num_kv_heads=2, head_size=16) == 12 * 2 * 2 * 16 * 2 + 8
    assert real_bytes(plan, num_kv_heads=2, head_size=16, block_size=16) == 16 * 2 * 2 * 16 * 2 + 8
    evicted = LayerPlan(keep=torch.arange(12))
    assert plan_accounting(evicted).effective == 12
    assert real_bytes(evicted, num_kv_heads=2, head_size=16) == 12 * 2 * 2 * 16 * 2


def test_fair_accounting_of_real_plans(make_layers) -> None:
    layers = make_layers(num_layers=2, n=400)
    budget = Budget(keep=0.25, sink_tokens=4, recent_tokens=16, block_size=16)
    for k, plan in zip(uniform_budgets(budget, 400, 2), get_policy("src").plan(layers, budget)):
        acc = plan_accounting(plan)
        assert acc.effective == plan.num_physical == k
        assert acc.nominal > acc.effective  # the bin's information rides along


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="bin_fraction"):
        get_policy("src", bin_fraction=0.0)
    with pytest.raises(ValueError, match="rank"):
        get_policy("src", rank=-1)
    with pytest.raises(ValueError, match="cannot make"):
        summarize_bin(torch.randn(2, 4, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8), 1.0, 4)
