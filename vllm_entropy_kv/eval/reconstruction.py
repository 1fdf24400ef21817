"""Attention-output reconstruction error per layer (the SRC article's metric).

Held-out queries (the first continuation tokens' queries, computed with the full cache) attend
once to the full prompt cache and once to the compressed one; the error is the mean squared
difference of the two attention outputs, per layer, and relative to the mean square of the
full output so layers of different scale compare.

Memory is accounted both ways the SRC article reports: FAIR, the effective budget in tokens
(kept + synthetic tokens, `policies.src.plan_accounting`), and REAL, the bytes the compressed
cache occupies (bf16 K/V plus one log-count per summary, `policies.src.real_bytes`), each as a
fraction of the full cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from vllm_entropy_kv.policies import LayerObservation, LayerPlan
from vllm_entropy_kv.policies.src import plan_accounting, real_bytes
from vllm_entropy_kv.policies.stats import attention_output, compressed_kv


@dataclass
class Reference:
    """Held-out queries [Hq, m, d] per layer and their attention output over the full cache."""

    queries: list[torch.Tensor]
    outputs: list[torch.Tensor]

    @classmethod
    def build(
        cls, layers: Sequence[LayerObservation], queries: Mapping[int, torch.Tensor]
    ) -> Reference:
        qs = [queries[i] for i in range(len(layers))]
        outs = [
            attention_output(q, o.keys, o.values, o.scale)[0]
            for q, o in zip(qs, layers, strict=True)
        ]
        return cls(queries=qs, outputs=outs)


@dataclass
class LayerErrors:
    """Per-layer MSE and relative MSE of the compressed attention output."""

    mse: list[float]
    relative: list[float]


def layer_errors(
    layers: Sequence[LayerObservation],
    plans: Sequence[LayerPlan],
    reference: Reference,
    use_bias: bool = True,
) -> LayerErrors:
    """Compare attention over each layer's compressed cache with the full-cache reference."""
    mse, rel = [], []
    for obs, plan, q, full in zip(layers, plans, reference.queries, reference.outputs, strict=True):
        keys, values, bias = compressed_kv(obs, plan)
        out, _ = attention_output(q, keys, values, obs.scale, bias if use_bias else None)
        err = float((out - full).pow(2).mean())
        mse.append(err)
        rel.append(err / max(float(full.pow(2).mean()), 1e-30))
    return LayerErrors(mse=mse, relative=rel)


def memory_accounting(
    plans: Sequence[LayerPlan], n: int, num_kv_heads: int, head_dim: int
) -> dict[str, float]:
    """FAIR (effective tokens) and REAL (bytes) fractions of the full prompt cache."""
    effective = sum(plan_accounting(p).effective for p in plans)
    nbytes = sum(real_bytes(p, num_kv_heads=num_kv_heads, head_size=head_dim) for p in plans)
    full_bytes = len(plans) * n * 2 * num_kv_heads * head_dim * 2
    return {"fair": effective / (len(plans) * n), "real": nbytes / full_bytes}
