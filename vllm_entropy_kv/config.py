"""Policy settings: one validated object, parsed from CLI flags or vLLM's `additional_config`.

The API server folds the `--kv-*` flags into `additional_config` (keys `kv_policy`,
`kv_budget`, ...), which vLLM ships to the engine core and the workers; each process
rebuilds the same `KVPolicyConfig` from it with `KVPolicyConfig.from_additional_config`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vllm_entropy_kv.policies import Budget, KVPolicy, available_policies, get_policy
from vllm_entropy_kv.policies.stats import QUERY_REDUCTIONS

# Policies the engine serves today. The offline evaluation can run every registered policy;
# a policy joins this list when it works end to end in `vllm serve`.
SERVED_POLICIES: tuple[str, ...] = (
    "none", "entropy", "entropy-merge", "src", "streaming", "snapkv", "pyramid",
)
DEFAULT_POLICY = "none"
ADDITIONAL_CONFIG_PREFIX = "kv_"


REQUEST_ARGS_FIELD = "vllm_xargs"  # where an OpenAI request carries its own `kv_*` settings

# Settings that are parameters of the policy dataclasses: setting -> the policy's field.
# A policy without that field ignores the setting (`reach` on snapkv, say); `policies_using`
# names the ones that read it, for the help texts.
POLICY_PARAMETERS: dict[str, str] = {
    "window": "observation_queries",
    "reach": "reach",
    "chunk_size": "chunk_size",
    "exponent": "exponent",
    "summary_fraction": "summary_fraction",
    "query_reduce": "query_reduce",
}
# Queries captured for a policy that looks at no attention (none, streaming): what the worker
# captured before `window` followed the policy; unused by those policies.
UNUSED_WINDOW = 32

# Valid values of the numeric settings: (test, the valid values in words for the error).
_VALID: dict[str, tuple[Callable[[Any], bool], str]] = {
    "budget": (
        lambda v: math.isfinite(v) and v > 0 and (v <= 1 or v == int(v)),
        "a fraction in (0, 1] or a whole number of tokens > 1",
    ),
    "sink_tokens": (lambda v: v >= 0, "an integer >= 0"),
    "recent_tokens": (lambda v: v >= 0, "an integer >= 0"),
    "window": (lambda v: v is None or v >= 1, "an integer >= 1 (unset: the policy's own)"),
    "reach": (lambda v: v >= 1, "an integer >= 1 (1: off)"),
    "chunk_size": (lambda v: v >= 1, "an integer >= 1 (1: per token)"),
    "exponent": (lambda v: math.isfinite(v) and v >= 0,
                 "a finite number >= 0 (0: uniform layer budgets)"),
    "summary_fraction": (lambda v: 0 <= v <= 1, "a fraction in [0, 1] (0: pure eviction)"),
    "query_reduce": (lambda v: v in QUERY_REDUCTIONS,
                     " or ".join(repr(r) for r in QUERY_REDUCTIONS)),
}


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
    window: observation window, the last prompt queries whose attention scores tokens (the
        policy's `observation_queries`); None, the default, means the server's window for
        that policy (`default_window`: 32 for every served policy that reads attention) and
        is resolved to that number on construction, since the worker captures `window`
        queries.
    merge_bias: summary tokens (entropy-merge, src) get log(count) added to their attention
        scores, so each weighs like the tokens it stands for.
    reach, chunk_size, exponent, query_reduce (entropy, entropy-merge) and summary_fraction
        (entropy-merge): the policies' parameters of those names; see `EntropyPolicy` and
        `EntropyMergePolicy`. The defaults are theirs but three, which RULER tuning splits
        and their test split ranked first (docs/RESULTS.md): the server's exponent is 0
        (uniform layer budgets; the policy's, the entropy paper's, is 1; ruler-tuning), and
        its entropy policies score tokens by the window query that attends to them most
        (query_reduce "max", the class's is "sum") over a window of 32 queries
        (`SERVED_WINDOWS`; the class's is 16; ruler-tuning-4).
    """

    policy: str = DEFAULT_POLICY
    budget: float = 0.25
    sink_tokens: int = 4
    recent_tokens: int = 32
    window: int | None = None
    merge_bias: bool = True
    reach: int = 32
    chunk_size: int = 32
    exponent: float = 0.0
    summary_fraction: float = 0.1
    query_reduce: str = "max"

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
        for name, (valid, words) in _VALID.items():
            value = getattr(self, name)
            if not valid(value):
                raise KVPolicyConfigError(
                    f"kv_{name}: {value!r} is out of range; valid: {words}", f"kv_{name}"
                )
        # Whether `window` was given: `settings()` leaves it out otherwise, so that a request
        # choosing another policy gets that policy's window, not this one's.
        object.__setattr__(self, "_window_given", self.window is not None)
        if self.window is None:
            object.__setattr__(self, "window", default_window(self.policy))

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

    def settings(self) -> dict[str, Any]:
        """`{field: value}` as given: `window` is None unless it was set (see __post_init__)."""
        values = dataclasses.asdict(self)
        if not self._window_given:
            values["window"] = None
        return values

    def make_policy(self) -> KVPolicy:
        """The policy object these settings describe, with its parameters set from them.
        Built once per distinct parameters and shared (policies keep no per-request state)."""
        defaults = _policy_defaults(self.policy)
        params = tuple(sorted(
            (param, getattr(self, setting))
            for setting, param in POLICY_PARAMETERS.items() if param in defaults
        ))
        return _make_policy(self.policy, params)

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
            # `int | None`: None was skipped above, so convert to the type itself.
            type_name = str(field.type).removesuffix(" | None")
            kind = {"str": str, "float": float, "int": int, "bool": _boolean}[type_name]
            try:
                converted[field.name] = kind(raw)
            except (TypeError, ValueError):
                raise KVPolicyConfigError(
                    f"kv_{field.name}: {raw!r} is not a valid {type_name}",
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
        merged = self.from_mapping({**self.settings(), **overrides})
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
            for name, value in self.settings().items()
        }


def policies_using(setting: str) -> list[str]:
    """The served policies that read a policy parameter setting (`POLICY_PARAMETERS`)."""
    return [name for name in SERVED_POLICIES
            if POLICY_PARAMETERS[setting] in _policy_defaults(name)]


# The server's window where the RULER tuning ranked another than the policy class's own
# (docs/RESULTS.md, ruler-tuning-4: 32 queries with query_reduce "max" against entropy's 16,
# whose window misses the first of several keys a question names). Every other policy keeps
# its own.
SERVED_WINDOWS: dict[str, int] = {"entropy": 32, "entropy-merge": 32}


def default_window(policy: str) -> int:
    """The observation window a policy gets when `window` is unset: the server's tuned one
    (`SERVED_WINDOWS`), else the policy's own."""
    if policy in SERVED_WINDOWS:
        return SERVED_WINDOWS[policy]
    own = _policy_defaults(policy).get("observation_queries")
    # None (every prompt query: h2o, which is not served) cannot be captured as a number.
    return own if isinstance(own, int) and own > 0 else UNUSED_WINDOW


@functools.cache
def _policy_defaults(policy: str) -> dict[str, Any]:
    """A registered policy's dataclass parameters and their defaults (class-level
    constants such as streaming's `observation_queries = 0` are not parameters)."""
    instance = get_policy(policy)
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}


@functools.lru_cache(maxsize=64)
def _make_policy(policy: str, params: tuple[tuple[str, Any], ...]) -> KVPolicy:
    return get_policy(policy, **dict(params))


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
