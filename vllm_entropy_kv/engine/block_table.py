"""Scheduler-side edits of vLLM's block bookkeeping: every private attribute of vLLM's KV cache
manager the plugin touches is touched here, read from vLLM 0.32.0
(`v1/core/single_type_kv_cache_manager.py`, `v1/core/block_pool.py`,
`v1/core/kv_cache_manager.py`), so that an upgrade breaks in this one module.

A compressed request's prompt blocks are never overwritten: they may be shared with other
requests through the prefix cache and are hashed under the tokens they hold. Compaction
instead moves the kept tokens into fresh blocks (`swap_in_kept_blocks`) and releases the
originals, which stay in the prefix cache until vLLM evicts them (docs/ENGINE.md,
"Prefix caching"). Blocks whose every token is kept would be copied unchanged: they stay,
still shared and hashed, and lead the compacted list.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Larger than any request's block count: `cache_blocks` hashes no block below it.
_NEVER_HASH = 1 << 62


@dataclass
class Swap:
    """What `swap_in_kept_blocks` did to one request."""

    kept_block_ids: dict[int, list[int]]  # per KV cache group: the kept blocks, in order
    freed_blocks: int  # the pool's free count after minus before, >= 0 (cached count as free)
    cached_blocks_released: int  # released originals still in the prefix cache
    blocks_kept_in_place: int  # prompt blocks kept whole, not copied


def has_blocks(manager: Any, req_id: str) -> bool:
    """Whether the request holds blocks in that group (running, not preempted or finished)."""
    return req_id in manager.req_to_blocks


def holds(manager: Any, req_id: str, block_ids: list[int]) -> bool:
    """Whether `block_ids` still lead the request's block list in that group (not preempted,
    finished or reallocated since they were given)."""
    blocks = manager.req_to_blocks.get(req_id)
    return blocks is not None and [b.block_id for b in blocks[: len(block_ids)]] == block_ids


def swap_in_kept_blocks(
    managers: list[Any], pool: Any, req_id: str, num_blocks: int, kept: dict[int, int],
    in_place: dict[int, list[int]],
) -> Swap | None:
    """In each group `g` of `kept`, replace the request's first `num_blocks` blocks (its
    compressed prompt) by `kept[g]` blocks and null entries: first the request's own blocks
    at the logical indices `in_place[g]`, whose every token is kept (left as they are:
    shared, hashed), then fresh ones. The other originals are released.

    The list keeps its logical length, so the partial prompt block and decode blocks stay at
    their logical positions (the scheduler hashes nothing of a compacted request, so no
    prompt block's list position matters to it). Returns None, changing nothing, when the
    request is gone or the pool cannot give the fresh blocks even after the release
    (originals shared with other requests free nothing).
    """
    rows = {g: managers[g].req_to_blocks.get(req_id) for g in kept}
    if any(row is None or len(row) < num_blocks for row in rows.values()):
        return None
    stay = {g: set(in_place[g]) for g in kept}
    released = {g: [block for i, block in enumerate(row[:num_blocks]) if i not in stay[g]]
                for g, row in rows.items()}
    releasable = sum(1 for blocks in released.values() for block in blocks
                     if not block.is_null and block.ref_cnt == 1)
    if pool.get_num_free_blocks() + releasable < sum(kept[g] - len(stay[g]) for g in kept):
        return None
    free_before = pool.get_num_free_blocks()
    originals = [block for blocks in released.values() for block in blocks
                 if not block.is_null]
    # Released first, so that a pool-neutral swap never needs spare blocks; the worker writes
    # the fresh ones only two steps on (docs/ENGINE.md), after every step that read these.
    pool.free_blocks(reversed(originals))
    cached_released = sum(1 for b in originals if b.ref_cnt == 0 and b.block_hash is not None)
    kept_ids: dict[int, list[int]] = {}
    for g, row in rows.items():
        fresh = pool.get_new_blocks(kept[g] - len(stay[g]))
        row[:num_blocks] = ([row[i] for i in in_place[g]] + fresh
                            + [pool.null_block] * (num_blocks - kept[g]))
        kept_ids[g] = [b.block_id for b in row[:kept[g]]]
        # The blocks from here on get KV computed over the compacted prompt, which their
        # token hashes do not describe: nothing more of this request enters the prefix cache.
        # (Blocks kept in place hold what their hashes say: computed over the whole prompt,
        # never written since.)
        managers[g].num_cached_block[req_id] = _NEVER_HASH
    # Prompt blocks shared with other requests (prefix hits) stay in use when released, so
    # a swap can take more fresh blocks than it frees; it then frees none (the count feeds
    # a Prometheus counter, which cannot fall).
    freed = max(0, pool.get_num_free_blocks() - free_before)
    return Swap(kept_ids, freed, cached_released, sum(map(len, stay.values())))


def limit_prefix_hits(kv_cache_manager: Any,
                      allowed_hit: Callable[[Any, int], int]) -> None:
    """Cap each request's prefix-cache hit at `allowed_hit(request, hit_tokens)` tokens (a
    multiple of the block size), so that a compressed request still computes its
    observation window (a cache holds keys and values, not queries). Wraps this manager's
    `get_computed_blocks`; vLLM then counts the capped hit in its prefix-cache metrics."""
    original = kv_cache_manager.get_computed_blocks

    @functools.wraps(original)
    def get_computed_blocks(request: Any):
        blocks, num_hit, shared_prefix_boundary = original(request)
        allowed = allowed_hit(request, num_hit)
        if allowed < num_hit:
            blocks = kv_cache_manager.truncate_computed_blocks(blocks, allowed)
            num_hit = allowed
        return blocks, num_hit, shared_prefix_boundary

    kv_cache_manager.get_computed_blocks = get_computed_blocks
