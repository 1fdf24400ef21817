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
        """The first `num_tokens` keys and values a block-table row points at, as two
        `[num_kv_heads, num_tokens, head_size]` tensors: values in the cache's dtype, keys in
        float32 stored `[num_kv_heads, head_size, num_tokens]`, the layout float32 attention
        over them (scoring, the biased rows) reads fastest. Converting in the one copy that
        reorders them costs no more than a plain copy, and spares a second."""
        num_blocks = -(-num_tokens // self.block_size)
        blocks = kv_cache.view(kv_cache.shape[0], -1).index_select(
            0, block_row[:num_blocks].long())
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.head_size)

        def per_block(index: torch.Tensor, strided: StridedTokens | None) -> torch.Tensor:
            """[Hkv, blocks, <token dims>, <dim dims>], a view where the layout allows."""
            if strided is None:
                return blocks[:, index].view(shape).permute(2, 0, 1, 3)
            view = blocks.as_strided((num_blocks, *strided.sizes),
                                     (blocks.shape[1], *strided.strides), strided.offset)
            return view.permute(3, 0, 1, 2, 4, 5)

        key, value = self.strided or (None, None)
        keys = per_block(self.key_index, key)
        transposed = torch.empty(self.num_kv_heads, self.head_size, num_blocks * self.block_size,
                                 dtype=torch.float32, device=blocks.device)
        transposed.transpose(1, 2).view(keys.shape).copy_(keys)
        values = per_block(self.value_index, value).reshape(self.num_kv_heads, -1,
                                                            self.head_size)
        return transposed.transpose(1, 2)[:, :num_tokens], values[:, :num_tokens]


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
