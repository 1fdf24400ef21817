"""The harness's attention function for HF transformers: records what the policies observe and
runs attention over a physically compacted cache.

`transformers.AttentionInterface.register(ATTENTION_NAME, eval_attention)` makes the function
selectable with `model.config._attn_implementation = ATTENTION_NAME`. Because the name is not in
`ALL_MASK_ATTENTION_FUNCTIONS`, transformers builds no mask for it (`masking_utils.
_preprocess_mask_arguments` exits early) and the function builds its own: every cached token
before the current chunk is visible, the chunk itself is causal. That is the right mask whatever
the cache holds (kept tokens, summaries), so continuation tokens can carry their logical
position ids while the cache is physically shorter.

State travels with each forward call as the `kv_eval` keyword (transformers passes unknown
model kwargs down to the attention function), so there is no global mutable state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION_NAME = "entropy_kv_eval"


@dataclass
class LayerRecord:
    """One layer's attention inputs in one forward call (batch dimension dropped).

    queries: [Hq, q, d] the recorded query positions; keys, values: [Hkv, L, d] everything the
    layer attended to (cache + this chunk), after RoPE.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scale: float


@dataclass
class AttentionState:
    """What one forward call asks of `eval_attention`.

    record_queries: query positions of this chunk to record (a slice), or None to record nothing.
    bias: per layer, an additive score bias [b] for the first b cached tokens (log of how many
        tokens a summary stands for, Attention Matching), or None.
    use_bias: switch the bias off to measure summaries without it.
    key_mask: per layer, an additive [rows, slots] mask over the cached slots of a stacked
        batch (`cache.stack`), in place of `bias`.
    records: filled per layer index when `record_queries` is set.
    """

    record_queries: slice | None = None
    bias: list[torch.Tensor | None] | None = None
    use_bias: bool = True
    key_mask: list[torch.Tensor] | None = None
    records: dict[int, LayerRecord] = field(default_factory=dict)

    def layer_bias(self, layer: int) -> torch.Tensor | None:
        if not self.use_bias or self.bias is None:
            return None
        return self.bias[layer]


def build_mask(
    q_len: int, kv_len: int, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """An additive [q_len, kv_len] mask: cached tokens visible (+bias), the new chunk causal.

    Returns None when plain causal attention with no cache (or one query, no bias) is exact.
    """
    past = kv_len - q_len
    if bias is None and (past == 0 or q_len == 1):
        return None
    mask = torch.zeros(q_len, kv_len, dtype=dtype)
    if q_len > 1:
        causal = torch.ones(q_len, q_len, dtype=torch.bool).triu(1)
        mask[:, past:].masked_fill_(causal, float("-inf"))
    if bias is not None:
        mask[:, : bias.numel()] += bias.to(dtype)
    return mask


def eval_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    kv_eval: AttentionState | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """SDPA (GQA-aware) over [rows, heads, tokens, d] with the harness's own mask and bias; more
    than one row only for a stacked batch (`kv_eval.key_mask`)."""
    if attention_mask is not None:
        raise ValueError("the eval attention builds its own mask; pass no attention_mask")
    stacked = kv_eval is not None and kv_eval.key_mask is not None
    if query.shape[0] != 1 and not stacked:
        raise ValueError("the eval harness runs one sequence at a time, or a stacked batch")
    layer = module.layer_idx
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bias = None
    if kv_eval is not None:
        if kv_eval.record_queries is not None:
            kv_eval.records[layer] = LayerRecord(
                queries=query[0, :, kv_eval.record_queries],
                keys=key[0],
                values=value[0],
                scale=float(scale),
            )
        bias = kv_eval.layer_bias(layer)
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = build_mask(q_len, kv_len, bias, query.dtype)
    if stacked:
        assert kv_eval is not None and kv_eval.key_mask is not None
        rows = kv_eval.key_mask[layer][:, None, None, :kv_len].to(query.dtype)
        mask = rows if mask is None else rows + mask
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        is_causal=mask is None and q_len > 1 and kv_len == q_len,
        scale=scale,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register `eval_attention` with transformers (idempotent) and return its name."""
    AttentionInterface.register(ATTENTION_NAME, eval_attention)
    return ATTENTION_NAME
