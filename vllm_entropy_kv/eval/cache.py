"""A physically compacted KV cache: what a `LayerPlan` leaves of a layer, in a DynamicCache.

Layers may hold different numbers of tokens. `position` is the logical position of the next
token (RoPE keeps counting prompt tokens that were dropped). `bias` holds, per layer, the
log(count) score bias of summary tokens (Attention Matching), aligned with the layer's first
cached tokens.

`stack` puts several states of the same prompt (one per policy and ratio) into one batch for
decoding: each layer's rows are padded to the longest row and the padding is masked out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from vllm_entropy_kv.policies import LayerObservation, LayerPlan
from vllm_entropy_kv.policies.stats import compressed_kv


@dataclass
class KVState:
    """A cache, the next logical position, and the per-layer summary bias."""

    cache: Cache
    position: int
    bias: list[torch.Tensor | None] | None = None
    # A stacked batch's per-layer additive [rows, slots] mask over its cache slots (padding
    # -inf, summaries their bias); it replaces `bias`, which is then None.
    key_mask: list[torch.Tensor] | None = None

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


class SlotLayer(DynamicLayer):
    """A layer's cache preallocated for `room` more tokens, which decoding writes in place.

    DynamicLayer concatenates the whole cache at every step: with 28 rows of ~1k tokens that
    copy was 60% of a decode step (Intel Xeon, 2 threads, 2026-12-06).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        super().__init__()
        rows, heads, length, dim = keys.shape
        self._keys = keys.new_zeros(rows, heads, length + room, dim)
        self._values = values.new_zeros(rows, heads, length + room, values.shape[-1])
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._fill(length)

    def _fill(self, length: int) -> None:
        self.length = length
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            raise ValueError(f"{end} tokens do not fit a slot cache of {self._keys.shape[-2]}")
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self._fill(end)
        return self.keys, self.values


def stack(states: Sequence[KVState], use_bias: Sequence[bool], room: int) -> KVState:
    """One batch of `states` (same prompt, so the same next position) with room for `room`
    more tokens per row; a row's summaries keep their bias where its `use_bias` says so.
    The states are not modified."""
    positions = {s.position for s in states}
    if len(positions) != 1:
        raise ValueError(f"stacked states must share the next position, got {sorted(positions)}")
    layers, masks = [], []
    for layer in range(len(states[0].cache.layers)):
        tensors = [s.layer_tensors(layer) for s in states]
        width = max(k.shape[1] for k, _ in tensors)
        mask = torch.full((len(states), width + room), float("-inf"))
        mask[:, width:] = 0.0
        keys = tensors[0][0].new_zeros(len(states), tensors[0][0].shape[0], width,
                                       tensors[0][0].shape[2])
        values = keys.new_zeros(keys.shape[:3] + (tensors[0][1].shape[2],))
        for row, (state, (k, v), bias_on) in enumerate(zip(states, tensors, use_bias, strict=True)):
            keys[row, :, : k.shape[1]] = k
            values[row, :, : v.shape[1]] = v
            mask[row, : k.shape[1]] = state.layer_bias(layer) if bias_on else 0.0
        layers.append(SlotLayer(keys, values, room))
        masks.append(mask)
    return KVState(cache=Cache(layers=layers), position=positions.pop(), key_mask=masks)
