"""Decode attention for layers that hold summary tokens with a log(count) bias.

A summary token stands for `count` prompt tokens (`LayerPlan.summary_counts`); attention gives
it its mass back by adding log(count) to its score. vLLM's CPU kernel has no per-token bias,
so for those requests the backend computes the attention rows itself, straight from the
paged cache (the kernel gets a one-token stand-in for them). Only the `vec` cache layout with
an unquantised cache is read here (keys stored [head_size, block_size] per block and head,
values [block_size, head_size]); elsewhere the summaries are served without the bias, with a
warning.
"""

from __future__ import annotations

import torch

BIAS_ISAS = frozenset({"vec"})


def bias_supported(isa: str, kv_cache_dtype: str) -> bool:
    return isa in BIAS_ISAS and kv_cache_dtype == "auto"


def paged_kv(
    kv_cache: torch.Tensor, block_row: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks holding the first `num_tokens` tokens a block-table row points at, from a
    `vec`-layout cache [num_blocks, Hkv, block_size, 2 * head_size]. Copied once and left in
    the cache's block layout (a further transpose would copy again): keys
    [Hkv, n, d, block_size], values [Hkv, n, block_size, d] for the row's first n blocks;
    slots past `num_tokens` hold whatever the cache holds."""
    _, num_kv_heads, block_size, two_d = kv_cache.shape
    d = two_d // 2
    num_blocks = -(-num_tokens // block_size)
    slabs = kv_cache.view(-1, num_kv_heads, 2, block_size * d).index_select(
        0, block_row[:num_blocks].long()
    )
    keys = slabs[:, :, 0].view(num_blocks, num_kv_heads, d, block_size).transpose(0, 1)
    values = slabs[:, :, 1].view(num_blocks, num_kv_heads, block_size, d).transpose(0, 1)
    return keys, values


def biased_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_row: torch.Tensor,
    num_tokens: int,
    log_bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of one request's last `t` tokens, queries [t, Hq, d], over its
    `num_tokens` cached tokens (the queries' own included), the first `log_bias.numel()` of
    which get `log_bias` added to their scores. Returns [t, Hq, d] float32."""
    keys, values = paged_kv(kv_cache, block_row, num_tokens)
    num_kv_heads, num_blocks, d, block_size = keys.shape
    t, num_heads, _ = query.shape
    group = num_heads // num_kv_heads
    q = (query.float() * scale).view(t, num_kv_heads, group, d).transpose(0, 1)
    q = q.reshape(num_kv_heads, 1, t * group, d)
    # Scores block by block ([Hkv, n, t * group, block]), then one row per query.
    logits = torch.matmul(q, keys.float()).transpose(1, 2)
    logits = logits.reshape(num_kv_heads, t * group, num_blocks * block_size)
    logits[..., : log_bias.numel()] += log_bias
    position = torch.arange(num_blocks * block_size)
    last_seen = num_tokens - t + torch.arange(t).repeat_interleave(group)
    logits.masked_fill_(position > last_seen[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).view(num_kv_heads, t * group, num_blocks, block_size)
    out = torch.matmul(probs.transpose(1, 2), values.float()).sum(dim=1)
    return out.view(num_kv_heads, t, group, d).transpose(0, 1).reshape(t, num_heads, d)
