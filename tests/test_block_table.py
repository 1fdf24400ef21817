"""The scheduler-side swap (`engine/block_table.py`) on vLLM's own block pool: which blocks a
compacted request keeps, which it releases, and what the pool gets back; and which blocks a
plan leaves in place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.v1.core.block_pool import BlockPool

from vllm_entropy_kv.engine.block_table import swap_in_kept_blocks
from vllm_entropy_kv.engine.worker import blocks_in_place
from vllm_entropy_kv.policies import LayerPlan

BLOCK = 16


@dataclass
class Manager:
    """The two attributes of vLLM's single-type manager that the swap reads and writes."""

    req_to_blocks: dict[str, list[Any]] = field(default_factory=dict)
    num_cached_block: dict[str, int] = field(default_factory=dict)


def request_with_blocks(
    pool_blocks: int, prompt_blocks: int, shared: int
) -> tuple[BlockPool, Manager, list[Any]]:
    """A pool and request "r" holding `prompt_blocks` prompt blocks and one decode block,
    its first `shared` blocks also held by another request (as a prefix-cache hit holds
    them); the request's blocks before any swap."""
    pool = BlockPool(num_gpu_blocks=pool_blocks, enable_caching=True, hash_block_size=BLOCK)
    manager = Manager()
    manager.req_to_blocks["r"] = pool.get_new_blocks(prompt_blocks + 1)
    pool.touch(manager.req_to_blocks["r"][:shared])
    return pool, manager, list(manager.req_to_blocks["r"])


def test_blocks_kept_whole_stay_and_the_rest_are_released() -> None:
    pool, manager, before = request_with_blocks(24, prompt_blocks=8, shared=3)
    free_before = pool.get_num_free_blocks()

    swap = swap_in_kept_blocks([manager], pool, "r", num_blocks=8, kept={0: 3},
                               in_place={0: [1, 4]})

    assert swap is not None
    row = manager.req_to_blocks["r"]
    # The blocks kept whole lead the list, the same blocks, the shared one still shared.
    assert row[:2] == [before[1], before[4]]
    assert [b.ref_cnt for b in row[:2]] == [2, 1]
    # The one fresh block: vLLM hands out uncached free blocks first, so maybe a released
    # original (the worker writes it only after every step that read it, docs/ENGINE.md).
    assert row[2] not in (before[1], before[4]) and row[2].ref_cnt == 1
    assert all(b.is_null for b in row[3:8]) and row[8] is before[8]  # decode block in place
    assert swap.kept_block_ids == {0: [b.block_id for b in row[:3]]}
    assert swap.blocks_kept_in_place == 2
    # 6 prompt blocks released, of which 2 are still held by the other request; 1 taken.
    assert [before[i].ref_cnt for i in (0, 2)] == [1, 1]
    assert swap.freed_blocks == 3 == pool.get_num_free_blocks() - free_before
    assert all(before[i].ref_cnt == 0 for i in (3, 5, 6, 7) if before[i] is not row[2])
    assert manager.num_cached_block["r"] > 9  # nothing more of it is hashed


def test_a_plan_that_keeps_everything_moves_nothing() -> None:
    pool, manager, before = request_with_blocks(24, prompt_blocks=8, shared=0)
    free_before = pool.get_num_free_blocks()

    swap = swap_in_kept_blocks([manager], pool, "r", num_blocks=8, kept={0: 8},
                               in_place={0: list(range(8))})

    assert swap is not None and swap.freed_blocks == 0 and swap.blocks_kept_in_place == 8
    assert manager.req_to_blocks["r"] == before
    assert pool.get_num_free_blocks() == free_before


def test_no_room_for_the_fresh_blocks_changes_nothing() -> None:
    """Shared originals free nothing when released: a swap that needs more fresh blocks
    than the pool then has is refused whole."""
    pool, manager, before = request_with_blocks(11, prompt_blocks=8, shared=8)
    pool.get_new_blocks(pool.get_num_free_blocks())  # another request takes the rest

    assert swap_in_kept_blocks([manager], pool, "r", num_blocks=8, kept={0: 3},
                               in_place={0: [1]}) is None
    assert manager.req_to_blocks["r"] == before
    assert [b.ref_cnt for b in before[:8]] == [2] * 8


def test_blocks_in_place_are_the_prompt_blocks_whose_every_token_is_kept() -> None:
    def in_place(keep: list[int], num_blocks: int = 4) -> list[int]:
        plan = LayerPlan(keep=torch.tensor(keep, dtype=torch.int64))
        return blocks_in_place(plan, BLOCK, num_blocks).tolist()

    assert in_place(list(range(4 * BLOCK))) == [0, 1, 2, 3]  # keep-all
    assert in_place([*range(2 * BLOCK), 2 * BLOCK + 5, *range(3 * BLOCK, 4 * BLOCK)]) == [0, 1, 3]
    assert in_place([*range(BLOCK - 1), BLOCK, *range(BLOCK + 1, 3 * BLOCK)]) == [1, 2]
    assert in_place([1, *range(2, 2 * BLOCK)]) == [1]  # a token of the first dropped
    assert in_place(list(range(BLOCK + 3))) == [0]  # a partial block stays out
    assert in_place([], num_blocks=2) == []
