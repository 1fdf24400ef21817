"""Per-layer budgets: exact, block-aligned totals and the shape of each split."""

from __future__ import annotations

import pytest
import torch

from vllm_entropy_kv.policies import Budget
from vllm_entropy_kv.policies.budgets import (
    entropy_budgets,
    layer_budgets,
    layer_floor,
    proportional_budgets,
    pyramid_budgets,
    round_to_blocks,
    total_budget,
    uniform_budgets,
    water_fill,
)

ENTROPIES = [0.15, 0.9, 0.4, 0.6, 0.3, 0.75, 0.5, 0.2]
ALLOCATIONS = ["uniform", "pyramid", "entropy"]


def split(allocation: str, budget: Budget, n: int, layers: int = 8) -> list[int]:
    return layer_budgets(allocation, budget, n, layers, ENTROPIES[:layers])


def check_layers(budgets: list[int], budget: Budget, n: int) -> None:
    block = budget.block_size
    floor = min(n, -(-layer_floor(n, budget) // block) * block)
    for b in budgets:
        assert b == n or b % block == 0, f"{b} is neither a multiple of {block} nor n={n}"
        assert floor <= b <= n


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("block", [1, 16, 32])
@pytest.mark.parametrize("n", [1024, 4096])
@pytest.mark.parametrize("keep", [0.125, 0.25, 0.5])
def test_total_exact_when_whole_blocks(allocation: str, block: int, n: int, keep: float) -> None:
    budget = Budget(keep=keep, block_size=block)
    assert total_budget(budget, n, 8) % block == 0  # these cases are whole numbers of blocks
    budgets = split(allocation, budget, n)
    assert sum(budgets) == total_budget(budget, n, 8)
    check_layers(budgets, budget, n)


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("n", [333, 1000, 2021, 7000])
@pytest.mark.parametrize("keep", [0.1, 0.3, 0.77, 0.95, 1.0])
def test_total_nearest_block(allocation: str, n: int, keep: float) -> None:
    budget = Budget(keep=keep, block_size=32)
    budgets = split(allocation, budget, n)
    check_layers(budgets, budget, n)
    floor = min(n, -(-layer_floor(n, budget) // 32) * 32)  # the floor, in whole blocks
    target = max(total_budget(budget, n, 8), 8 * floor)
    assert abs(sum(budgets) - target) <= 16


def test_token_count_budget() -> None:
    budget = Budget(keep=256, block_size=16)
    assert sum(uniform_budgets(budget, 5000, 8)) == 8 * 256
    assert uniform_budgets(budget, 5000, 8) == [256] * 8


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_keep_all(allocation: str) -> None:
    for n in (1, 17, 1000, 1001):
        assert split(allocation, Budget(keep=1.0, block_size=32), n) == [n] * 8


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_short_prompts_kept_whole(allocation: str) -> None:
    # Shorter than a block: nothing to free.
    assert split(allocation, Budget(keep=0.25, block_size=32), 20) == [20] * 8
    # Shorter than sinks + recent: the floor is the whole prompt.
    tiny = Budget(keep=0.1, sink_tokens=4, recent_tokens=32, block_size=1)
    assert split(allocation, tiny, 30) == [30] * 8


def test_floor_is_rounded_up_to_a_block() -> None:
    budget = Budget(keep=0.05, sink_tokens=4, recent_tokens=32, block_size=32)
    # floor = 36 tokens -> 2 blocks, even though the budget asks for fewer.
    assert uniform_budgets(budget, 200, 4) == [64] * 4
    check_layers(pyramid_budgets(budget, 2000, 6), budget, 2000)


def test_entropy_gives_more_to_higher_entropy() -> None:
    budget = Budget(keep=0.3, block_size=16)
    budgets = entropy_budgets(ENTROPIES, budget, 4096)
    order = sorted(range(8), key=lambda i: ENTROPIES[i])
    assert [budgets[i] for i in order] == sorted(budgets)
    assert budgets[1] > budgets[0] * 3  # 0.9 vs 0.15
    # exponent sharpens the split; exponent 0 is uniform.
    sharper = entropy_budgets(ENTROPIES, budget, 4096, exponent=2.0)
    assert sharper[1] > budgets[1] and sharper[0] < budgets[0]
    flat = entropy_budgets(ENTROPIES, budget, 4096, exponent=0.0)
    assert flat == uniform_budgets(budget, 4096, 8)


def test_entropy_clamps() -> None:
    budget = Budget(keep=0.25, block_size=16)
    n = 4096
    budgets = entropy_budgets(ENTROPIES, budget, n, min_fraction=0.2, max_fraction=0.4)
    assert sum(budgets) == total_budget(budget, n, 8)
    for b in budgets:
        assert 0.2 * n - 16 <= b <= 0.4 * n + 16  # clamps hold up to block rounding
    # Unsatisfiable clamps yield to the total.
    budgets = entropy_budgets(ENTROPIES, budget, n, min_fraction=0.5)
    assert sum(budgets) == total_budget(budget, n, 8)


def test_pyramid_decreases() -> None:
    budgets = pyramid_budgets(Budget(keep=0.2, block_size=16), 4096, 12)
    assert budgets == sorted(budgets, reverse=True)
    assert budgets[0] > 4 * budgets[-1]
    assert pyramid_budgets(Budget(keep=0.2, block_size=16), 4096, 1) == [816]


def test_water_fill_and_rounding() -> None:
    x = water_fill([1.0, 2.0, 7.0], 100.0, 10.0, 60.0)
    torch.testing.assert_close(x.sum(), torch.tensor(100.0, dtype=torch.float64))
    assert float(x[2]) == pytest.approx(60.0)  # clamped, excess handed to the others
    assert float(x[1]) == pytest.approx(2 * float(x[0]))
    budget = Budget(keep=1.0, sink_tokens=0, recent_tokens=0, block_size=1)
    # Largest remainder: 10.5, 10.5, 11 -> total 32 exactly, ties to the lower layer.
    assert round_to_blocks([10.5, 10.5, 11.0], 100, budget) == [11, 10, 11]
    assert proportional_budgets([0.0, 0.0], Budget(keep=0.5, block_size=1), 100) == [50, 50]


def test_unknown_allocation() -> None:
    with pytest.raises(ValueError, match="uniform"):
        layer_budgets("cubic", Budget(keep=0.5), 100, 4)
    with pytest.raises(ValueError, match="entropies"):
        layer_budgets("entropy", Budget(keep=0.5), 100, 4)
