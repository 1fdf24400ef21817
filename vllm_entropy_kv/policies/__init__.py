"""Compression policies: pure torch, no vLLM import. See `base.py` for the contract."""

from vllm_entropy_kv.policies.base import Budget, KVPolicy, LayerObservation, LayerPlan
from vllm_entropy_kv.policies.registry import available_policies, get_policy, register_policy

__all__ = [
    "Budget",
    "KVPolicy",
    "LayerObservation",
    "LayerPlan",
    "available_policies",
    "get_policy",
    "register_policy",
]
