"""Reading keys and values back from vLLM's CPU paged KV cache, whatever its in-block layout.

vLLM 0.32's CPU attention stores a block in a layout chosen per ISA (`_get_attn_isa` in
`vllm/v1/attention/backends/cpu_attn.py`: `vec`, `vec16`, `amx`, and `neon`, `vsx`, `vxe`,
`rvv` off x86); `amx`, for one, packs keys in pairs for its tile instructions. The only
documented way in is the write op, `cpu_attn_reshape_and_cache`. So the inverse is learnt from
that op: write one block of tokens whose values spell their own index, see where each lands,
and keep the map. Any layout the op writes as a plain permutation of its inputs is read back
exactly, today's and a future version's alike; a quantised cache (fp8) is not a permutation
and has no inverse here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

# Digits of an element's index, each exact in every unquantised cache dtype (bf16 holds the
# integers up to 256 exactly).
_BASE = 256
_UNWRITTEN, _OTHER_HALF = -1.0, -2.0


def attention_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The layout vLLM's CPU attention picks on this CPU for an unquantised cache (private
    `_get_attn_isa`, read from vLLM 0.32.0)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size)


def request_amx_permission() -> None:
    """Linux lets a process run AMX tile instructions only after it asks (arch_prctl); vLLM's
    worker asks at start-up, any other process that runs the CPU attention kernels (a test,
    a benchmark) must ask itself or die with SIGILL. Idempotent; a no-op without AMX."""
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()


@dataclass(frozen=True)
class StridedTokens:
    """One half (keys or values) of a block as a strided view of the block's flat storage:
    sizes and strides of the dims `(t // p, t % p, h, d // q, d % q)` from `offset`. Every
    layout vLLM 0.32 has is one (`amx` packs pairs of tokens or dims); a strided copy reads
    it about 2-3x faster than an element-wise gather."""

    offset: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]


@dataclass(frozen=True)
class BlockLayout:
    """Where token t, head h, dim d of a block sits in the block's flat storage (the
    `[num_kv_heads, block_size, 2 * head_size]` slab of one block), for keys and values:
    `key_index[(t * num_kv_heads + h) * head_size + d]`."""

    num_kv_heads: int
    block_size: int
    head_size: int
    key_index: torch.Tensor
    value_index: torch.Tensor

    @functools.cached_property
    def strided(self) -> tuple[StridedTokens, StridedTokens] | None:
        """Keys and values as strided views, or None if either half is not one."""
        key = _strided_tokens(self.key_index, self.block_size, self.num_kv_heads,
                              self.head_size)
        value = _strided_tokens(self.value_index, self.block_size, self.num_kv_heads,
                                self.head_size)
        return None if key is None or value is None else (key, value)

    def gather(
        self, kv_cache: torch.Tensor, block_row: torch.Tensor, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `num_tokens` keys and values a block-table row points at (`gather_keys`,
        `gather_values`)."""
        return (self.gather_keys(kv_cache, block_row, num_tokens),
                self.gather_values(kv_cache, block_row, num_tokens))

    def gather_keys(
        self, kv_cache: torch.Tensor, block_row: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        """The first `num_tokens` keys a block-table row points at, `[num_kv_heads,
        num_tokens, head_size]` in float32 stored `[num_kv_heads, head_size, num_tokens]`: the
        layout float32 attention over them (scoring, the biased rows) reads fastest."""
        rows = self._block_rows(block_row, num_tokens)
        key = self.strided[0] if self.strided else None
        if key is None:
            by_dim = self._elementwise(kv_cache, rows, self.key_index).permute(2, 3, 0, 1)
        else:
            # Selecting blocks along a dim that follows the head and dim dims writes them
            # `[Hkv, d, positions]` in one copy, 2x faster than reordering selected blocks.
            by_dim = _every_block(kv_cache, key).permute(3, 4, 5, 0, 1, 2).index_select(3, rows)
        keys = by_dim.reshape(self.num_kv_heads, self.head_size, -1).float().contiguous()
        return keys.transpose(1, 2)[:, :num_tokens]

    def gather_values(
        self, kv_cache: torch.Tensor, block_row: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        """The first `num_tokens` values a block-table row points at, `[num_kv_heads,
        num_tokens, head_size]` in the cache's dtype."""
        rows = self._block_rows(block_row, num_tokens)
        value = self.strided[1] if self.strided else None
        tokens = (self._elementwise(kv_cache, rows, self.value_index) if value is None
                  else _every_block(kv_cache, value).index_select(0, rows))
        return tokens.reshape(-1, self.num_kv_heads, self.head_size).transpose(0, 1)[:, :num_tokens]

    def values_at(
        self, kv_cache: torch.Tensor, block_row: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The values of the logical `positions` of a block-table row, `[num_kv_heads,
        len(positions), head_size]` in the cache's dtype: a policy that does not read values
        needs only its kept tokens'."""
        blocks = block_row.long()[positions // self.block_size]
        offsets = positions % self.block_size
        value = self.strided[1] if self.strided else None
        if value is None:
            flat = kv_cache.view(kv_cache.shape[0], -1)
            within = self.value_index.view(self.block_size, -1)[offsets]
            tokens = flat[blocks.unsqueeze(1), within]
        else:
            pack = value.sizes[1]
            tokens = _every_block(kv_cache, value)[blocks, offsets // pack, offsets % pack]
        return tokens.reshape(-1, self.num_kv_heads, self.head_size).transpose(0, 1)

    def _block_rows(self, block_row: torch.Tensor, num_tokens: int) -> torch.Tensor:
        return block_row[: -(-num_tokens // self.block_size)].long()

    def _elementwise(
        self, kv_cache: torch.Tensor, rows: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """`[blocks, block_size, Hkv, d]` of the blocks `rows`, for a layout that is no strided
        view."""
        blocks = kv_cache.view(kv_cache.shape[0], -1).index_select(0, rows)
        return blocks[:, index].view(-1, self.block_size, self.num_kv_heads, self.head_size)


def _every_block(kv_cache: torch.Tensor, half: StridedTokens) -> torch.Tensor:
    """One half of every block of the cache, a view `[num_blocks, <token dims>, Hkv, <dim
    dims>]` (`StridedTokens`)."""
    flat = kv_cache.view(kv_cache.shape[0], -1)
    return flat.as_strided((flat.shape[0], *half.sizes), (flat.shape[1], *half.strides),
                           flat.storage_offset() + half.offset)


def _strided_tokens(
    index: torch.Tensor, block_size: int, num_kv_heads: int, head_size: int
) -> StridedTokens | None:
    """`index` (positions of `(t, h, d)` in a block) as a strided view, with tokens and dims
    split into packs of up to 16, or None if no such view matches it everywhere."""
    packs = [1, 2, 4, 8, 16]
    for p, q in ((p, q) for p in packs for q in packs
                 if block_size % p == 0 and head_size % q == 0):
        sizes = (block_size // p, p, num_kv_heads, head_size // q, q)
        positions = index.view(sizes)
        offset = int(positions.view(-1)[0])
        # A dim's stride: how far one step along it moves (0 for a dim of size 1).
        strides = [int(positions[tuple(int(d == dim and size > 1) for d in range(5))]) - offset
                   for dim, size in enumerate(sizes)]
        try:
            expected = torch.as_strided(torch.arange(int(index.max()) + 1), sizes, strides,
                                        offset)
        except RuntimeError:  # a negative stride, or a view beyond the block
            continue
        if torch.equal(expected, positions):
            return StridedTokens(offset, sizes, tuple(strides))
    return None


def write_tokens(
    kv_cache: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    isa: str,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    kv_cache_dtype: str = "auto",
) -> None:
    """Store `[t, num_kv_heads, head_size]` keys and values at cache slots (block * block_size
    + offset) with vLLM's own op, in the layout `isa` reads."""
    from vllm import _custom_ops as ops

    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    key_cache, value_cache = kv_cache.view(
        num_blocks, num_kv_heads, 2 * block_size, two_d // 2
    ).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        keys.to(kv_cache.dtype).contiguous(), values.to(kv_cache.dtype).contiguous(),
        key_cache, value_cache, slots.to(torch.int64),
        isa, k_scale=k_scale, v_scale=v_scale, kv_cache_dtype=kv_cache_dtype,
    )


@functools.cache
def block_layout(
    isa: str, dtype: torch.dtype, num_kv_heads: int, block_size: int, head_size: int
) -> BlockLayout | None:
    """The layout `isa` gives an unquantised cache of `dtype`, learnt once per process from
    the write op; None if that op does not store a permutation of its inputs."""
    size = block_size * num_kv_heads * head_size
    index = torch.arange(size).view(block_size, num_kv_heads, head_size)
    slots = torch.arange(block_size)

    def positions(is_key: bool) -> torch.Tensor | None:
        found = torch.zeros(num_kv_heads * block_size * 2 * head_size, dtype=torch.int64)
        for digit in range(max(1, math.ceil(math.log(size, _BASE)))):
            spelled = (index // _BASE**digit % _BASE).to(dtype)
            other = torch.full_like(spelled, _OTHER_HALF)
            cache = torch.full((1, num_kv_heads, block_size, 2 * head_size), _UNWRITTEN,
                               dtype=dtype)
            write_tokens(cache, *((spelled, other) if is_key else (other, spelled)), slots, isa)
            flat = cache.view(-1).float()
            if bool((flat == _UNWRITTEN).any()):
                return None  # not every byte of the block is a copy of an input
            found += flat.clamp(min=0).to(torch.int64) * _BASE**digit
        mine = flat != _OTHER_HALF
        spelt = found[mine]
        if spelt.numel() != size or bool((spelt >= size).any()):
            return None
        where = torch.full((size,), -1, dtype=torch.int64)
        where[spelt] = torch.nonzero(mine).squeeze(1)
        return None if bool((where < 0).any()) else where

    key_index, value_index = positions(is_key=True), positions(is_key=False)
    if key_index is None or value_index is None:
        return None
    return BlockLayout(num_kv_heads, block_size, head_size, key_index, value_index)


def cache_layout(isa: str, kv_cache: torch.Tensor, kv_cache_dtype: str) -> BlockLayout | None:
    """The layout of a `[num_blocks, num_kv_heads, block_size, 2 * head_size]` CPU cache, or
    None where it cannot be read back (a quantised cache dtype)."""
    from vllm.utils.torch_utils import is_quantized_kv_cache

    if is_quantized_kv_cache(kv_cache_dtype):
        return None
    _, num_kv_heads, block_size, two_d = kv_cache.shape
    return block_layout(isa, kv_cache.dtype, num_kv_heads, block_size, two_d // 2)
