"""Compression policies: pure torch, no vLLM import. See `base.py` for the contract."""

from vllm_entropy_kv.policies.base import Budget, KVPolicy, LayerObservation, LayerPlan, Rope
from vllm_entropy_kv.policies.registry import available_policies, get_policy, register_policy

# Importing a policy module registers it (@register_policy).
from vllm_entropy_kv.policies import (  # noqa: E402,F401  isort: skip
    entropy,
    entropy_merge,
    expected_attention,
    h2o,
    none,
    pyramid,
    random,
    snapkv,
    src,
    streaming,
    topk,
)

__all__ = [
    "Budget",
    "KVPolicy",
    "LayerObservation",
    "LayerPlan",
    "Rope",
    "available_policies",
    "get_policy",
    "register_policy",
]
