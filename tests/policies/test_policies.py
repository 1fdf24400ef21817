"""Contract tests run on every registered policy, plus each baseline's own behaviour."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vllm_entropy_kv.policies import (
    Budget,
    LayerObservation,
    available_policies,
    get_policy,
)
from vllm_entropy_kv.policies.budgets import (
    entropy_budgets,
    pyramid_budgets,
    total_budget,
    uniform_budgets,
)
from vllm_entropy_kv.policies.selection import carry_forward, chunk_scores
from vllm_entropy_kv.policies.stats import attention_stats, layer_entropies

ALL = available_policies()
COMPRESSING = [name for name in ALL if name != "none"]
WITH_SUMMARIES = {"entropy-merge", "src"}


def expected_budgets(name: str, layers: list[LayerObservation], budget: Budget) -> list[int]:
    n, num_layers = layers[0].num_tokens, len(layers)
    if name in ("entropy", "entropy-merge"):
        ents = layer_entropies([attention_stats(o) for o in layers])
        return entropy_budgets(ents, budget, n)
    if name == "pyramid":
        return pyramid_budgets(budget, n, num_layers)
    return uniform_budgets(budget, n, num_layers)


def observe(make_layers, name: str, **kwargs):
    """Layers with the queries the policy asks for (H2O: every prompt query)."""
    n = kwargs.pop("n", 300)
    wanted = get_policy(name).observation_queries
    window = n if wanted is None else max(wanted, 1)
    return make_layers(n=n, window=min(window, n), **kwargs)


@pytest.mark.parametrize("name", COMPRESSING)
@pytest.mark.parametrize("block", [1, 16])
def test_plans_hold_exactly_their_budget(make_layers, valid_plan, name: str, block: int) -> None:
    budget = Budget(keep=0.25, sink_tokens=4, recent_tokens=16, block_size=block)
    layers = observe(make_layers, name, num_layers=6, n=320)
    plans = get_policy(name).plan(layers, budget)
    assert len(plans) == len(layers)
    budgets = expected_budgets(name, layers, budget)
    assert [p.num_physical for p in plans] == budgets
    assert sum(budgets) == total_budget(budget, 320, 6)
    for plan in plans:
        valid_plan(plan, 320)
        assert plan.num_physical % block == 0


@pytest.mark.parametrize("name", COMPRESSING)
def test_sinks_and_recent_always_kept(make_layers, budget: Budget, name: str) -> None:
    layers = observe(make_layers, name, num_layers=3, n=400)
    for plan in get_policy(name).plan(layers, budget):
        kept = set(plan.keep.tolist())
        assert set(range(budget.sink_tokens)) <= kept
        assert set(range(400 - budget.recent_tokens, 400)) <= kept


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("block", [1, 16])
def test_keep_all_is_identity(make_layers, name: str, block: int) -> None:
    layers = observe(make_layers, name, num_layers=3, n=100)
    for plan in get_policy(name).plan(layers, Budget(keep=1.0, block_size=block)):
        assert torch.equal(plan.keep, torch.arange(100))
        assert plan.num_summaries == 0 and plan.summary_keys is None


@pytest.mark.parametrize("name", ALL)
def test_short_prompt(make_layers, name: str) -> None:
    """Shorter than sinks + recent, and shorter than a block: everything stays."""
    layers = observe(make_layers, name, num_layers=2, n=12)
    for plan in get_policy(name).plan(layers, Budget(keep=0.2, block_size=16)):
        assert torch.equal(plan.keep, torch.arange(12)) and plan.num_summaries == 0


@pytest.mark.parametrize("name", ALL)
def test_deterministic(make_layers, budget: Budget, name: str) -> None:
    layers = observe(make_layers, name, num_layers=3)
    first = get_policy(name).plan(layers, budget)
    second = get_policy(name).plan(layers, budget)
    for a, b in zip(first, second):
        assert torch.equal(a.keep, b.keep)
        if a.summary_keys is not None:
            assert torch.equal(a.summary_keys, b.summary_keys)
            assert torch.equal(a.summary_values, b.summary_values)
            assert torch.equal(a.summary_counts, b.summary_counts)


@pytest.mark.parametrize("name", ALL)
def test_a_policy_that_reads_no_values_plans_the_same_without_them(
    make_layers, budget: Budget, name: str
) -> None:
    """`reads_values` is what the engine trusts to skip reading the prompt's values back: a
    policy that declares False plans the same without them, one that reads them says so."""
    layers = observe(make_layers, name, num_layers=3)
    policy = get_policy(name)
    with_values = policy.plan(layers, budget)
    without = [dataclasses.replace(o, values=None) for o in layers]
    if policy.reads_values:
        assert name in WITH_SUMMARIES | {"expected-attention"}
        with pytest.raises((AttributeError, TypeError)):
            policy.plan(without, budget)
        return
    assert name not in WITH_SUMMARIES
    for a, b in zip(with_values, policy.plan(without, budget)):
        assert torch.equal(a.keep, b.keep) and b.num_summaries == 0


@pytest.mark.parametrize("name", sorted(WITH_SUMMARIES))
def test_summary_shapes(make_layers, budget: Budget, name: str) -> None:
    layers = observe(make_layers, name, num_layers=3, n=400, dtype=torch.bfloat16)
    for plan in get_policy(name).plan(layers, budget):
        s = plan.num_summaries
        assert s > 0
        assert plan.summary_keys.shape == (2, s, 16) and plan.summary_keys.dtype == torch.bfloat16
        assert plan.summary_values.shape == (2, s, 16)
        assert plan.summary_values.dtype == torch.bfloat16
        assert plan.summary_counts.shape == (s,) and plan.summary_counts.dtype == torch.int64
        assert bool((plan.summary_counts >= 1).all())
        # Summaries stand for dropped tokens only.
        assert int(plan.summary_counts.sum()) <= 400 - plan.keep.numel()


@pytest.mark.parametrize("name", ALL)
def test_is_a_documented_dataclass(name: str) -> None:
    policy = get_policy(name)
    assert dataclasses.is_dataclass(policy)
    assert type(policy).name == name
    assert type(policy).__doc__ and len(type(policy).__doc__) > 80


# ---------------------------------------------------------------- per-policy behaviour


def test_none_ignores_the_budget(make_layers) -> None:
    plans = get_policy("none").plan(make_layers(num_layers=2), Budget(keep=0.1))
    assert all(torch.equal(p.keep, torch.arange(200)) for p in plans)
    assert get_policy("none").observation_queries == 0


def test_streaming_keeps_sinks_and_the_most_recent(make_layers) -> None:
    budget = Budget(keep=50, sink_tokens=4, recent_tokens=8, block_size=1)
    plans = get_policy("streaming").plan(make_layers(num_layers=2), budget)
    expected = list(range(4)) + list(range(154, 200))
    assert all(p.keep.tolist() == expected for p in plans)


def test_random_is_seeded(make_layers, budget: Budget) -> None:
    layers = make_layers(num_layers=2)
    a = get_policy("random", seed=1).plan(layers, budget)
    b = get_policy("random", seed=1).plan(layers, budget)
    c = get_policy("random", seed=2).plan(layers, budget)
    assert torch.equal(a[0].keep, b[0].keep)
    assert not torch.equal(a[0].keep, c[0].keep)
    assert not torch.equal(a[0].keep, a[1].keep)  # layers draw differently


def spiky_layer(n: int, hot: list[int], window: int = 8, d: int = 8) -> LayerObservation:
    """Every window query attends almost only to the `hot` tokens."""
    keys = torch.zeros(1, n, d)
    keys[0, hot, 0] = 8.0
    queries = torch.zeros(2, window, d)
    queries[..., 0] = 1.0
    return LayerObservation(queries, keys, torch.randn(1, n, d), 1.0)


@pytest.mark.parametrize("name", ["topk", "snapkv", "entropy", "h2o", "pyramid"])
def test_attention_policies_keep_the_attended_tokens(name: str) -> None:
    hot = [40, 77, 123]
    # Room for the pooled neighbourhoods (SnapKV smooths over 5 tokens) and for entropy's
    # three 32-token chunks.
    budget = Budget(keep=110, sink_tokens=2, recent_tokens=4, block_size=1)
    # Without entropy's reach, whose continuations would double the chunks (tested below).
    params = {"reach": 1} if name == "entropy" else {}
    plan = get_policy(name, **params).plan([spiky_layer(200, hot)], budget)[0]
    assert set(hot) <= set(plan.keep.tolist())


def test_entropy_keeps_whole_chunks_around_attended_tokens() -> None:
    budget = Budget(keep=38, sink_tokens=2, recent_tokens=4, block_size=1)
    plan = get_policy("entropy", chunk_size=16, reach=1).plan([spiky_layer(200, [40, 77])],
                                                              budget)[0]
    assert set(range(32, 48)) | set(range(64, 80)) <= set(plan.keep.tolist())
    per_token = get_policy("entropy", chunk_size=1, reach=1).plan([spiky_layer(200, [40, 77])],
                                                                  budget)[0]
    assert not set(range(32, 48)) <= set(per_token.keep.tolist())


def test_entropy_keeps_what_follows_an_attended_token() -> None:
    """The needle's case: the question attends to a fact's key, its answer follows it."""
    budget = Budget(keep=36, sink_tokens=2, recent_tokens=2, block_size=1)
    layer = spiky_layer(200, [60])
    carried = get_policy("entropy", chunk_size=1, reach=32).plan([layer], budget)[0]
    assert set(range(60, 92)) <= set(carried.keep.tolist())
    alone = get_policy("entropy", chunk_size=1, reach=1).plan([layer], budget)[0]
    assert not set(range(60, 92)) <= set(alone.keep.tolist())


def test_carry_forward_takes_the_best_score_within_reach() -> None:
    scores = torch.tensor([0.0, 5.0, 1.0, float("nan"), 0.0, 2.0])
    assert carry_forward(scores, 3).tolist() == [0.0, 5.0, 5.0, 5.0, 1.0, 2.0]
    assert carry_forward(scores, 1) is scores
    assert carry_forward(torch.tensor([float("nan"), 1.0]), 2)[0].isnan()


def test_chunk_scores_average_each_chunk_and_skip_nan() -> None:
    scores = torch.tensor([1.0, 3.0, float("nan"), 4.0, 6.0])
    assert chunk_scores(scores, 2).tolist() == [2.0, 2.0, 4.0, 4.0, 6.0]
    assert chunk_scores(scores, 1) is scores


def test_snapkv_pooling_keeps_neighbours() -> None:
    budget = Budget(keep=20, sink_tokens=2, recent_tokens=4, block_size=1)
    layer = spiky_layer(200, [100])
    pooled = get_policy("snapkv", kernel_size=5, pooling="max").plan([layer], budget)[0]
    assert set(range(98, 103)) <= set(pooled.keep.tolist())
    plain = get_policy("topk").plan([layer], budget)[0]
    assert 100 in plain.keep.tolist()


def test_h2o_accumulates_over_all_prompt_queries() -> None:
    """Token 10 is hot for the early queries only: H2O keeps it, a 4-query window does not."""
    n, d = 64, 8
    keys = torch.zeros(1, n, d)
    keys[0, 10, 0] = 10.0
    queries = torch.zeros(1, n, d)
    queries[0, :40, 0] = 1.0  # queries 0..39 look at token 10, later ones spread out
    obs = LayerObservation(queries, keys, torch.randn(1, n, d), 1.0)
    budget = Budget(keep=8, sink_tokens=2, recent_tokens=4, block_size=1)
    assert get_policy("h2o").observation_queries is None
    assert 10 in get_policy("h2o").plan([obs], budget)[0].keep.tolist()
    # Same scores as the statistics over all queries, computed in chunks.
    stats = attention_stats(obs, None, chunk_elements=64)
    assert stats.num_queries == n
    assert 10 not in get_policy("topk", observation_queries=4).plan([obs], budget)[0].keep.tolist()


def test_entropy_policy_gives_broad_layers_more(make_layers) -> None:
    layers = make_layers(num_layers=4, n=512, sharpness=[6.0, 0.3, 3.0, 1.0])
    plans = get_policy("entropy").plan(layers, Budget(keep=0.25, block_size=16))
    sizes = [p.num_physical for p in plans]
    assert sizes[1] > sizes[3] > sizes[2] > sizes[0]


def test_pyramid_layers_shrink(make_layers) -> None:
    plans = get_policy("pyramid").plan(make_layers(num_layers=5, n=512), Budget(keep=0.25))
    sizes = [p.num_physical for p in plans]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_bad_layers_are_rejected(make_layers, budget: Budget) -> None:
    layers = make_layers(num_layers=1)
    bad = LayerObservation(layers[0].queries[:3], layers[0].keys, layers[0].values, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        get_policy("topk").plan([bad], budget)
