"""Policy names to policy classes. `--kv-policy` choices and the evaluation read this table."""

from __future__ import annotations

from typing import Any

from vllm_entropy_kv.policies.base import KVPolicy

_REGISTRY: dict[str, type[KVPolicy]] = {}


def register_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    """Class decorator: make a policy available under its `name`."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"policy name {cls.name!r} is taken by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    _load_builtin_policies()
    return sorted(_REGISTRY)


def get_policy(name: str, **params: Any) -> KVPolicy:
    """Build the policy registered as `name` with its dataclass parameters."""
    _load_builtin_policies()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown KV policy {name!r}; valid: {', '.join(sorted(_REGISTRY))}"
        ) from None
    return cls(**params)


def _load_builtin_policies() -> None:
    # Importing the package runs each module's @register_policy.
    import vllm_entropy_kv.policies  # noqa: F401
