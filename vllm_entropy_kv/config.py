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
SERVED_POLICIES: tuple[str, ...] = (
    "none", "entropy", "entropy-merge", "src", "streaming", "snapkv", "pyramid",
)
DEFAULT_POLICY = "none"
ADDITIONAL_CONFIG_PREFIX = "kv_"


REQUEST_ARGS_FIELD = "vllm_xargs"  # where an OpenAI request carries its own `kv_*` settings


class KVPolicyConfigError(ValueError):
    """A policy setting out of range; the message names the field and the valid values.

    field: the setting's `kv_*` name, or None when the error is about several settings.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class KVPolicyConfig:
    """Settings of the KV compression policy.

    policy: registered policy name; `none` leaves vLLM untouched.
    budget: fraction of each prompt's KV kept, in (0, 1], or a token count per layer (> 1).
    sink_tokens: first prompt tokens always kept (attention sinks).
    recent_tokens: last prompt tokens always kept.
    window: observation window, the last prompt queries whose attention scores tokens.
    merge_bias: summary tokens (entropy-merge, src) get log(count) added to their attention
        scores, so each weighs like the tokens it stands for.
    """

    policy: str = DEFAULT_POLICY
    budget: float = 0.25
    sink_tokens: int = 4
    recent_tokens: int = 32
    window: int = 32
    merge_bias: bool = True

    def __post_init__(self) -> None:
        if self.policy not in SERVED_POLICIES:
            hint = ""
            if self.policy in available_policies():
                hint = " (it runs in the offline evaluation but is not served yet)"
            raise KVPolicyConfigError(
                f"kv_policy: unknown or unsupported policy {self.policy!r}{hint}; "
                f"valid: {', '.join(SERVED_POLICIES)}",
                "kv_policy",
            )
        if not self.budget > 0 or (self.budget > 1 and self.budget != int(self.budget)):
            raise KVPolicyConfigError(
                f"kv_budget: {self.budget!r} is out of range; valid: a fraction in (0, 1] "
                "or a whole number of tokens > 1",
                "kv_budget",
            )
        for name in ("sink_tokens", "recent_tokens"):
            if getattr(self, name) < 0:
                raise KVPolicyConfigError(
                    f"kv_{name}: must be >= 0, got {getattr(self, name)}", f"kv_{name}"
                )
        if self.window < 1:
            raise KVPolicyConfigError(
                f"kv_window: must be >= 1, got {self.window}", "kv_window"
            )

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
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            prefix = ADDITIONAL_CONFIG_PREFIX
            raise KVPolicyConfigError(
                f"unknown KV policy setting(s) {[prefix + name for name in unknown]}; "
                f"valid: {[prefix + name for name in cls.field_names()]}",
                prefix + unknown[0],
            )
        converted: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in values or values[field.name] is None:
                continue
            raw = values[field.name]
            kind = {"str": str, "float": float, "int": int, "bool": _boolean}[str(field.type)]
            try:
                converted[field.name] = kind(raw)
            except (TypeError, ValueError):
                raise KVPolicyConfigError(
                    f"kv_{field.name}: {raw!r} is not a valid {field.type}",
                    f"kv_{field.name}",
                ) from None
        return cls(**converted)

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> KVPolicyConfig:
        """Read the `kv_*` keys of vLLM's `additional_config`; other keys are not ours."""
        return cls.from_mapping(_our_settings(additional_config))

    def for_request(self, extra_args: Mapping[str, Any] | None) -> KVPolicyConfig:
        """This (server) config with a request's own `kv_*` settings on top.

        `extra_args` is the request's `SamplingParams.extra_args` (the OpenAI field
        `vllm_xargs`); its other keys are not ours. A server started with the policy `none`
        has no compression set up (cache layout, scheduling), so a request cannot turn it on.
        """
        overrides = _our_settings(extra_args)
        if not overrides:
            return self
        merged = self.from_mapping({**dataclasses.asdict(self), **overrides})
        if merged.enabled and not self.enabled:
            raise KVPolicyConfigError(
                f"kv_policy: {merged.policy!r} needs a server started with a KV policy; this "
                "one runs `--kv-policy none`, so compression is not set up (valid here: none)",
                "kv_policy",
            )
        return merged

    def to_additional_config(self) -> dict[str, Any]:
        return {
            ADDITIONAL_CONFIG_PREFIX + name: value
            for name, value in dataclasses.asdict(self).items()
        }


def _our_settings(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """`{field: value}` from the `kv_*` keys of a mapping."""
    prefix = ADDITIONAL_CONFIG_PREFIX
    return {
        key[len(prefix):]: value
        for key, value in (values or {}).items()
        if key.startswith(prefix)
    }


def _boolean(raw: Any) -> bool:
    """A bool from JSON or the command line: true/false, 1/0, yes/no."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(raw)
