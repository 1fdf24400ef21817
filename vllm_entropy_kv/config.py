"""Policy settings: one validated object, parsed from CLI flags or vLLM's `additional_config`.

The API server folds the `--kv-*` flags into `additional_config` (keys `kv_policy`,
`kv_budget`, ...), which vLLM ships to the engine core and the workers; each process
rebuilds the same `KVPolicyConfig` from it with `KVPolicyConfig.from_additional_config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_entropy_kv.policies import Budget, available_policies

# Policies the engine serves today. The offline evaluation can run every registered policy;
# a policy joins this list when it works end to end in `vllm serve`.
SERVED_POLICIES: tuple[str, ...] = ("none", "entropy", "streaming", "snapkv", "pyramid")
DEFAULT_POLICY = "none"
ADDITIONAL_CONFIG_PREFIX = "kv_"


class KVPolicyConfigError(ValueError):
    """A policy setting out of range; the message names the field and the valid values."""


@dataclass(frozen=True)
class KVPolicyConfig:
    """Settings of the KV compression policy.

    policy: registered policy name; `none` leaves vLLM untouched.
    budget: fraction of each prompt's KV kept, in (0, 1], or a token count per layer (> 1).
    sink_tokens: first prompt tokens always kept (attention sinks).
    recent_tokens: last prompt tokens always kept.
    window: observation window, the last prompt queries whose attention scores tokens.
    """

    policy: str = DEFAULT_POLICY
    budget: float = 0.25
    sink_tokens: int = 4
    recent_tokens: int = 32
    window: int = 32

    def __post_init__(self) -> None:
        if self.policy not in SERVED_POLICIES:
            hint = ""
            if self.policy in available_policies():
                hint = " (it runs in the offline evaluation but is not served yet)"
            raise KVPolicyConfigError(
                f"kv_policy: unknown or unsupported policy {self.policy!r}{hint}; "
                f"valid: {', '.join(SERVED_POLICIES)}"
            )
        if not self.budget > 0 or (self.budget > 1 and self.budget != int(self.budget)):
            raise KVPolicyConfigError(
                f"kv_budget: {self.budget!r} is out of range; valid: a fraction in (0, 1] "
                "or a whole number of tokens > 1"
            )
        for name in ("sink_tokens", "recent_tokens"):
            if getattr(self, name) < 0:
                raise KVPolicyConfigError(f"kv_{name}: must be >= 0, got {getattr(self, name)}")
        if self.window < 1:
            raise KVPolicyConfigError(f"kv_window: must be >= 1, got {self.window}")

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    def budget_for(self, block_size: int) -> Budget:
        return Budget(
            keep=self.budget,
            sink_tokens=self.sink_tokens,
            recent_tokens=self.recent_tokens,
            block_size=block_size,
        )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> KVPolicyConfig:
        """Build from `{field: value}`, converting strings; unknown keys are an error."""
        unknown = set(values) - set(cls.field_names())
        if unknown:
            raise KVPolicyConfigError(
                f"unknown KV policy setting(s) {sorted(unknown)}; valid: {cls.field_names()}"
            )
        converted: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in values or values[field.name] is None:
                continue
            raw = values[field.name]
            kind = {"str": str, "float": float, "int": int}[str(field.type)]
            try:
                converted[field.name] = kind(raw)
            except (TypeError, ValueError):
                raise KVPolicyConfigError(
                    f"kv_{field.name}: {raw!r} is not a valid {kind.__name__}"
                ) from None
        return cls(**converted)

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> KVPolicyConfig:
        """Read the `kv_*` keys of vLLM's `additional_config`; other keys are not ours."""
        prefix = ADDITIONAL_CONFIG_PREFIX
        ours = {
            key[len(prefix):]: value
            for key, value in (additional_config or {}).items()
            if key.startswith(prefix)
        }
        return cls.from_mapping(ours)

    def to_additional_config(self) -> dict[str, Any]:
        return {
            ADDITIONAL_CONFIG_PREFIX + name: value
            for name, value in dataclasses.asdict(self).items()
        }
