"""Which policies the tables compare, and how each is given its budget.

Every row of the result tables is a `Variant`: a registered policy and whether its summary
tokens get the log(count) attention bias. Budgets are matched on REAL memory by default: a
policy that appends summary tokens beyond its nominal budget is re-planned with a smaller
`Budget.keep` until its physical tokens (kept + summaries, averaged over layers) fit the
same number of tokens every other policy gets. `match="nominal"` passes the ratio unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from vllm_entropy_kv.policies import Budget, KVPolicy, LayerObservation, LayerPlan, get_policy

DEFAULT_WINDOW = 32
REFERENCE = "none"
Match = Literal["real", "nominal"]
_MAX_CALIBRATION_STEPS = 4


@dataclass(frozen=True)
class Variant:
    """A table row: a policy name, and whether summaries get the log(count) bias."""

    policy: str
    use_bias: bool = True

    @property
    def label(self) -> str:
        return self.policy if self.use_bias else f"{self.policy} (no bias)"

    @property
    def is_reference(self) -> bool:
        return self.policy == REFERENCE


def variants(policies: Iterable[str], bias_ablation: Iterable[str] = ()) -> list[Variant]:
    """The rows: `none` first (the full-cache reference), then every policy; policies named in
    `bias_ablation` get a second row without the bias."""
    names = list(dict.fromkeys(policies))
    rows = [Variant(REFERENCE)] if REFERENCE in names else []
    for name in names:
        if name == REFERENCE:
            continue
        rows.append(Variant(name))
        if name in bias_ablation:
            rows.append(Variant(name, use_bias=False))
    return rows


def widest_window(policies: Sequence[KVPolicy]) -> int | None:
    """How many prompt queries to record so that every policy gets the window it declares in
    `KVPolicy.observation_queries` (None = every prompt query). Policies use the last ones."""
    windows = [getattr(p, "observation_queries", DEFAULT_WINDOW) for p in policies]
    if any(w is None for w in windows):
        return None
    return max([w for w in windows if w], default=DEFAULT_WINDOW)


def kept_fraction(plans: Sequence[LayerPlan], num_tokens: int) -> float:
    """Physical tokens (kept + summaries) over all layers, as a fraction of the full cache."""
    return sum(p.num_physical for p in plans) / (len(plans) * num_tokens)


@dataclass
class PlanResult:
    """Plans for every layer, the `Budget.keep` that produced them, and what they hold."""

    plans: list[LayerPlan]
    keep: float
    kept_fraction: float
    seconds: float


def make_plans(
    policy: KVPolicy,
    layers: list[LayerObservation],
    ratio: float,
    match: Match = "real",
    budget: Budget | None = None,
) -> PlanResult:
    """Plan `layers` at keep `ratio` (a fraction, or a token count when > 1, as in `Budget`);
    with match="real", shrink the budget until the plans' physical tokens (summaries count
    like kept tokens) fit what `Budget(keep=ratio)` allows."""
    template = budget or Budget(keep=ratio)
    n = layers[0].num_tokens
    target = template.tokens_per_layer(n)
    keep = ratio
    start = time.perf_counter()
    plans = policy.plan(layers, _with_keep(template, keep))
    for _ in range(_MAX_CALIBRATION_STEPS if match == "real" else 0):
        physical = sum(p.num_physical for p in plans) / len(plans)
        if physical <= target + 0.5:
            break
        keep = keep * target / physical
        plans = policy.plan(layers, _with_keep(template, keep))
    return PlanResult(plans, keep, kept_fraction(plans, n), time.perf_counter() - start)


def _with_keep(budget: Budget, keep: float) -> Budget:
    return Budget(
        keep=keep,
        sink_tokens=budget.sink_tokens,
        recent_tokens=budget.recent_tokens,
        block_size=budget.block_size,
    )


def cases(variants: Sequence[Variant], ratios: Sequence[float]) -> list[tuple[Variant, float]]:
    """(variant, ratio) pairs: the full-cache reference once at 1.0, every other at each ratio."""
    out: list[tuple[Variant, float]] = []
    for variant in variants:
        out += [(variant, 1.0)] if variant.is_reference else [(variant, r) for r in ratios]
    return out


class Planner:
    """Plans per (policy, ratio) for one prefill, computed once and shared by the variants of
    a policy (with and without bias)."""

    def __init__(
        self, policies: dict[str, KVPolicy], layers: list[LayerObservation], match: Match = "real"
    ) -> None:
        self.policies = policies
        self.layers = layers
        self.match = match
        self._done: dict[tuple[str, float], PlanResult] = {}

    def __call__(self, policy: str, ratio: float) -> PlanResult:
        key = (policy, ratio)
        if key not in self._done:
            self._done[key] = make_plans(self.policies[policy], self.layers, ratio, self.match)
        return self._done[key]


def build_policies(variants: Sequence[Variant]) -> dict[str, KVPolicy]:
    return {v.policy: get_policy(v.policy) for v in variants}
