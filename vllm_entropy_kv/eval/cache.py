"""A physically compacted KV cache: what a `LayerPlan` leaves of a layer, in a DynamicCache.

Layers may hold different numbers of tokens. `position` is the logical position of the next
token (RoPE keeps counting prompt tokens that were dropped). `bias` holds, per layer, the
log(count) score bias of summary tokens (Attention Matching), aligned with the layer's first
cached tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from vllm_entropy_kv.policies import LayerObservation, LayerPlan
from vllm_entropy_kv.policies.stats import compressed_kv


@dataclass
class KVState:
    """A cache, the next logical position, and the per-layer summary bias."""

    cache: DynamicCache
    position: int
    bias: list[torch.Tensor | None] | None = None

    @classmethod
    def empty(cls) -> KVState:
        return cls(cache=DynamicCache(), position=0)

    def physical_tokens(self) -> list[int]:
        """Tokens each layer holds now."""
        return [layer.keys.shape[-2] for layer in self.cache.layers]

    def layer_tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[Hkv, L, d] keys and values of one layer."""
        cached = self.cache.layers[layer]
        return cached.keys[0], cached.values[0]

    def layer_bias(self, layer: int) -> torch.Tensor:
        """The full-length [L] bias of one layer (zeros where none was set)."""
        length = self.cache.layers[layer].keys.shape[-2]
        full = torch.zeros(length)
        if self.bias is not None and self.bias[layer] is not None:
            known = self.bias[layer]
            full[: known.numel()] = known
        return full


def apply_plans(
    layers: Sequence[LayerObservation],
    plans: Sequence[LayerPlan],
    position: int,
    prior_bias: Sequence[torch.Tensor] | None = None,
) -> KVState:
    """Build the compacted cache: per layer, the kept tokens then the summary tokens
    (`policies.stats.compressed_kv`, which also gives the summaries their log(count) bias).

    prior_bias: per layer [n] bias the observed tokens already carry (repeated compression).
    The observations are never modified, so many plans can be applied to one prefill.
    """
    data = []
    biases: list[torch.Tensor | None] = []
    for idx, (obs, plan) in enumerate(zip(layers, plans, strict=True)):
        keys, values, bias = compressed_kv(obs, plan)
        if prior_bias is not None:
            bias[: plan.keep.numel()] += prior_bias[idx][plan.keep]
        data.append((keys.unsqueeze(0).contiguous(), values.unsqueeze(0).contiguous()))
        biases.append(bias if bool(bias.ne(0).any()) else None)
    has_bias = any(b is not None for b in biases)
    return KVState(cache=DynamicCache(data), position=position, bias=biases if has_bias else None)
