"""Prefill a prompt and turn what each layer saw into the policies' `LayerObservation`s."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vllm_entropy_kv.eval.attention import LayerRecord
from vllm_entropy_kv.eval.cache import KVState
from vllm_entropy_kv.eval.model import Model
from vllm_entropy_kv.policies import LayerObservation, Rope


@dataclass
class Prefill:
    """A prompt after prefill: its full cache and, per layer, the recorded queries and K/V;
    the model's RoPE goes into the observations."""

    kv: KVState
    records: dict[int, LayerRecord]
    rope: Rope | None = None

    @property
    def num_tokens(self) -> int:
        return self.records[0].keys.shape[1]

    def observations(self, window: int | None) -> list[LayerObservation]:
        """One observation per layer with the last `window` recorded queries (None: all)."""
        return observations(self.records, window, self.rope)


def observations(
    records: Mapping[int, LayerRecord], window: int | None, rope: Rope | None = None
) -> list[LayerObservation]:
    """LayerObservations from records, keeping the last `window` queries (None: all recorded)."""
    out = []
    for idx in range(len(records)):
        rec = records[idx]
        queries = rec.queries if window is None else rec.queries[:, -window:]
        out.append(
            LayerObservation(queries=queries, keys=rec.keys, values=rec.values, scale=rec.scale,
                             rope=rope)
        )
    return out


def prefill(
    model: Model, input_ids: torch.Tensor, window: int | None, kv: KVState | None = None
) -> Prefill:
    """Run `input_ids` (after `kv`, if given) and record the last `window` queries of every layer
    (None: every query) together with the layer's keys and values after this chunk."""
    record = slice(None) if window is None else slice(-window, None)
    step = model.forward(input_ids, kv, record=record)
    return Prefill(kv=step.kv, records=step.records, rope=model.rope)
