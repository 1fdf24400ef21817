"""PyramidKV: SnapKV's scores with budgets that shrink from the lower to the upper layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vllm_entropy_kv.policies.base import Budget
from vllm_entropy_kv.policies.budgets import pyramid_budgets
from vllm_entropy_kv.policies.registry import register_policy
from vllm_entropy_kv.policies.selection import LayerScores
from vllm_entropy_kv.policies.snapkv import SnapKVPolicy


@register_policy
@dataclass
class PyramidPolicy(SnapKVPolicy):
    """PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on
    Pyramidal Information Funneling"): lower layers attend broadly, upper layers to a few
    tokens, so budgets fall linearly with depth; tokens are chosen as in SnapKV.

    beta: the top layer gets 1/beta of the mean budget, the bottom layer 2 - 1/beta of it.
    Other parameters: see SnapKVPolicy.
    """

    name: ClassVar[str] = "pyramid"
    beta: float = 20.0

    def allocate(self, scores: LayerScores, budget: Budget, n: int) -> list[int]:
        return pyramid_budgets(budget, n, scores.tokens.shape[0], self.beta)
