"""The block-ownership check (`VLLM_ENTROPY_KV_CHECK_BLOCKS=1`) on its own: the server tests
run with it on and pass only if it never fires, so here it is made to fire. Requests may share
a block only as the prefix cache shares it: one layer, one logical position; a compacted
request's fresh kept blocks are its own, its blocks kept in place keep their position."""

from __future__ import annotations

import pytest
import torch

from vllm_entropy_kv.engine.worker import (
    BlockOwnershipError,
    CompactedLayer,
    CompressionWorker,
)


def blocks(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64)


def compacted(kept: list[int], in_place: list[int], num_blocks: int) -> CompactedLayer:
    return CompactedLayer(torch.tensor(kept, dtype=torch.int32), num_blocks, blocks(*in_place))


def test_a_kept_row_reads_its_blocks_at_their_logical_positions() -> None:
    # Prompt blocks 3 and 7 kept whole (in place), two fresh blocks, then the tail, which
    # starts after the 10 compressed prompt blocks.
    layer = compacted([30, 70, 91, 92], in_place=[3, 7], num_blocks=10)
    assert layer.logical_positions(6).tolist() == [3, 7, -1, -1, 10, 11]
    assert layer.logical_positions(3).tolist() == [3, 7, -1]


def test_prefix_sharing_passes() -> None:
    worker = CompressionWorker()
    worker.note_blocks_read("a", 0, blocks(5, 6, 8), blocks(0, 1, 2))
    worker.note_blocks_read("b", 0, blocks(5, 6, 9), blocks(0, 1, 2))
    worker.check_blocks_read()


def test_a_block_kept_in_place_is_shared_at_its_own_position() -> None:
    """Request a, compacted, keeps its prompt block 3 (physical 30) in place; request b,
    uncompressed, hit the same cached block and reads it at position 3 too."""
    worker = CompressionWorker()
    layer = compacted([30, 91], in_place=[3], num_blocks=6)
    worker.note_blocks_read("a", 0, blocks(30, 91, 60), layer.logical_positions(3))
    worker.note_blocks_read("b", 0, blocks(0, 10, 20, 30), blocks(0, 1, 2, 3))
    worker.check_blocks_read()


@pytest.mark.parametrize("second_read", [
    ("b", 0, blocks(7), blocks(2)),  # the same block at another logical position
    ("a", 1, blocks(7), blocks(1)),  # the same block in another layer
], ids=["position", "layer"])
def test_a_block_read_as_two_things_fires(second_read) -> None:
    worker = CompressionWorker()
    worker.note_blocks_read("a", 0, blocks(7), blocks(1))
    worker.note_blocks_read(*second_read)
    with pytest.raises(BlockOwnershipError, match=r"\[7\]"):
        worker.check_blocks_read()


def test_a_fresh_kept_block_read_by_another_request_fires() -> None:
    """What a block handed on too early looks like: request b's compaction was given block
    91 as a fresh kept block while request a still reads it as its own, in the same layer at
    the same (-1) position, which a position check alone would not catch."""
    worker = CompressionWorker()
    layer = compacted([30, 91], in_place=[3], num_blocks=6)
    worker.note_blocks_read("a", 0, blocks(30, 91, 60), layer.logical_positions(3))
    worker.note_blocks_read("b", 0, blocks(91), blocks(-1))
    with pytest.raises(BlockOwnershipError, match=r"\[91\]"):
        worker.check_blocks_read()


def test_each_step_is_checked_alone() -> None:
    worker = CompressionWorker()
    worker.note_blocks_read("a", 0, blocks(7), blocks(1))
    worker.check_blocks_read()
    worker.note_blocks_read("b", 0, blocks(7), blocks(2))  # a later step: a's read is gone
    worker.check_blocks_read()
