"""The rows of the leaderboard: a registered policy with parameters, plus the ablations.

An arm is a policy from `policies/` (built through the registry, never re-implemented), its
dataclass parameters, whether summary tokens get the log(count) bias, and whether its summary
tokens are dropped (to tell what SRC's summaries add to its kept tokens).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from vllm_entropy_kv.policies import (
    Budget,
    KVPolicy,
    LayerPlan,
    available_policies,
    get_policy,
)

REFERENCE = "none"
RECENT = "recent_tokens="


@dataclass(frozen=True)
class Arm:
    label: str
    policy: str
    params: tuple[tuple[str, Any], ...] = ()
    use_bias: bool = True
    kept_only: bool = False
    # A budget setting, not a policy field: the last prompt tokens every policy keeps.
    recent_tokens: int = Budget.recent_tokens

    @property
    def plan_key(self) -> tuple[str, tuple[tuple[str, Any], ...], int]:
        """Arms with the same key share one plan per ratio (bias and dropping summaries are
        applied after planning)."""
        return self.policy, self.params, self.recent_tokens

    def budget(self, ratio: float) -> Budget:
        return Budget(keep=ratio, recent_tokens=self.recent_tokens)

    def build(self) -> KVPolicy:
        return get_policy(self.policy, **dict(self.params))

    def applied(self, plans: list[LayerPlan]) -> list[LayerPlan]:
        """The plans this arm runs with: summaries dropped for a kept-only arm."""
        if not self.kept_only:
            return plans
        return [LayerPlan(keep=p.keep, layer_entropy=p.layer_entropy) for p in plans]


ABLATIONS = {
    # The entropy policy's selection with every layer given the same budget (exponent 0):
    # isolates what the entropy budgets add.
    "entropy-uniform": Arm("entropy-uniform", "entropy", (("exponent", 0.0),)),
    # The entropy policy choosing single tokens (no 32-token chunks, no reach): what its
    # phrase-level selection adds over SnapKV-like per-token scores.
    "entropy-token": Arm("entropy-token", "entropy", (("chunk_size", 1), ("reach", 1))),
    "entropy-merge-nobias": Arm("entropy-merge-nobias", "entropy-merge", use_bias=False),
    # SRC without its synthetic tokens: what its kept tokens alone do (its budget minus rank).
    "src-kept": Arm("src-kept", "src", kept_only=True),
}


def served_arm_name(policy: str = "entropy") -> str:
    """`policy:field=value:...` for what `vllm serve --kv-policy <policy>` plans with by
    default: the fields where the server's defaults (`config.KVPolicyConfig`) differ from the
    policy class's, so the leaderboard row of the served setting has one name."""
    from vllm_entropy_kv.config import KVPolicyConfig

    served = KVPolicyConfig(policy=policy).make_policy()
    own = get_policy(policy)
    changed = sorted((f.name, getattr(served, f.name)) for f in fields(served)
                     if f.init and getattr(served, f.name) != getattr(own, f.name))
    return ":".join([policy, *(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in changed)])


# entropy-merge without the merge (summary_fraction 0) plans exactly what `entropy` plans (the
# same scores, budgets and selection), so `entropy` is that row.
DEFAULT_ARMS = (
    "none",
    "entropy",
    served_arm_name(),
    "entropy-uniform",
    "snapkv",
    "pyramid",
    "streaming",
    "entropy-merge",
    "entropy-merge-nobias",
    "src",
    "src-kept",
)


def arm(name: str) -> Arm:
    """A registered policy with its defaults, one of the ABLATIONS, or a policy with some
    parameters set, written `policy:field=value:field=value` (e.g. `entropy:exponent=0.5`),
    for tuning runs. `recent_tokens=N` sets the budget's recent tokens (`Budget`, the
    server's `--kv-recent-tokens`) instead of a policy field."""
    if name in ABLATIONS:
        return ABLATIONS[name]
    policy, *settings = name.split(":")
    if policy in available_policies():
        recent = [s for s in settings if s.startswith(RECENT)]
        settings = [s for s in settings if not s.startswith(RECENT)]
        defaults = {f.name: f.default for f in fields(type(get_policy(policy)))
                    if f.init and f.default is not MISSING}
        params = tuple(sorted(_setting(policy, s, defaults) for s in settings))
        if not recent:
            return Arm(name, policy, params)
        try:
            return Arm(name, policy, params, recent_tokens=int(recent[-1][len(RECENT):]))
        except ValueError:
            raise ValueError(f"{name!r}: recent_tokens is an integer") from None
    valid = ", ".join([*available_policies(), *ABLATIONS])
    raise ValueError(f"unknown arm {name!r}; valid: {valid}, or policy:field=value")


def _setting(policy: str, text: str, defaults: dict[str, Any]) -> tuple[str, Any]:
    """`field=value` of `policy`, the value parsed as the type of the field's default."""
    key, sep, value = text.partition("=")
    if not sep or key not in defaults:
        raise ValueError(f"{text!r} is not field=value of {policy}; fields: "
                         f"{', '.join(sorted(defaults))}")
    default = defaults[key]
    if value.lower() == "none":
        return key, None
    if isinstance(default, bool):
        return key, value.lower() in ("1", "true", "yes")
    if default is None:
        return key, value
    try:
        return key, type(default)(value)
    except ValueError:
        raise ValueError(f"{policy}: {key}={value!r} is not of type {type(default).__name__} "
                         f"(default {default!r})") from None
