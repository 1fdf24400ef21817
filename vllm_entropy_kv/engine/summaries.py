"""Decode attention for layers that hold summary tokens with a log(count) bias.

A summary token stands for `count` prompt tokens (`LayerPlan.summary_counts`); attention gives
it its mass back by adding log(count) to its score. vLLM's CPU kernel has no per-token bias,
so for those requests the backend computes the attention rows itself with `attention_output`
(the same function the offline evaluation uses) over the keys and values read back from the
paged cache; the kernel gets a one-token stand-in for them. Only the `vec` cache layout with
an unquantised cache is read here (keys stored [head_size, block_size] per block and head,
values [block_size, head_size]); elsewhere the summaries are served without the bias, with a
warning.
"""

from __future__ import annotations

import torch

from vllm_entropy_kv.policies.stats import attention_output

BIAS_ISAS = frozenset({"vec"})


def bias_supported(isa: str, kv_cache_dtype: str) -> bool:
    return isa in BIAS_ISAS and kv_cache_dtype == "auto"


def gather_kv(
    kv_cache: torch.Tensor, block_row: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `num_tokens` keys and values a block-table row points at, from a `vec`-layout
    cache [num_blocks, Hkv, block_size, 2 * head_size]. Returns two [Hkv, num_tokens, d]."""
    _, num_kv_heads, block_size, two_d = kv_cache.shape
    d = two_d // 2
    num_blocks = -(-num_tokens // block_size)
    slabs = kv_cache.view(-1, num_kv_heads, 2, block_size * d)[block_row[:num_blocks].long()]
    keys = slabs[:, :, 0].reshape(num_blocks, num_kv_heads, d, block_size).permute(1, 0, 3, 2)
    values = slabs[:, :, 1].reshape(num_blocks, num_kv_heads, block_size, d).transpose(0, 1)
    keys = keys.reshape(num_kv_heads, num_blocks * block_size, d)[:, :num_tokens]
    values = values.reshape(num_kv_heads, num_blocks * block_size, d)[:, :num_tokens]
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
    keys, values = gather_kv(kv_cache, block_row, num_tokens)
    t, num_heads, _ = query.shape
    bias = torch.zeros(num_tokens, dtype=torch.float32)
    bias[: log_bias.numel()] = log_bias
    visible = None  # a lone decode query sees every cached token: no mask to pay for
    if t > 1:
        # attention_output's rows are (GQA group member, query): query i sees up to itself.
        last_seen = num_tokens - t + torch.arange(t).repeat(num_heads // keys.shape[0])
        visible = torch.arange(num_tokens) <= last_seen[:, None]
    out, _ = attention_output(query.transpose(0, 1), keys, values, scale, bias, visible)
    return out.transpose(0, 1)
