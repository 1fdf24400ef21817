"""Decode attention for layers that hold summary tokens with a log(count) bias.

A summary token stands for `count` prompt tokens (`LayerPlan.summary_counts`); attention gives
it its mass back by adding log(count) to its score. vLLM's CPU kernel has no per-token bias,
so for those requests the backend computes the attention rows itself with `attention_output`
(the same function the offline evaluation uses) over the keys and values read back from the
paged cache through its layout's inverse (`cache_layout`, every unquantised layout); the
kernel gets a one-token stand-in for them.
"""

from __future__ import annotations

import torch

from vllm_entropy_kv.engine.cache_layout import BlockLayout
from vllm_entropy_kv.policies.stats import attention_output


def biased_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: BlockLayout,
    block_row: torch.Tensor,
    num_tokens: int,
    log_bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of one request's last `t` tokens, queries [t, Hq, d], over its
    `num_tokens` cached tokens (the queries' own included), the first `log_bias.numel()` of
    which get `log_bias` added to their scores. Returns [t, Hq, d] float32."""
    keys, values = layout.gather(kv_cache, block_row, num_tokens)
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
