"""95% confidence intervals of mean scores: Wilson for pass/fail cells, a seeded percentile
bootstrap for partial scores and for averages over tasks."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959964
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A mean score in [0, 1] with its 95% interval and the number of samples behind it."""

    mean: float
    low: float
    high: float
    samples: int


def wilson(successes: int, total: int) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    denom = 1 + Z95**2 / total
    centre = (p + Z95**2 / (2 * total)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / total + Z95**2 / (4 * total**2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def percentile_interval(values: list[float]) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of bootstrap replicates (sorts `values`)."""
    values.sort()
    last = len(values) - 1
    return values[round(0.025 * last)], values[round(0.975 * last)]


def estimate(scores: Sequence[float], seed: int = 0) -> Estimate:
    """Mean and 95% interval of one cell's per-sample scores (Wilson when every score is 0
    or 1, else bootstrap)."""
    n = len(scores)
    mean = sum(scores) / n if n else 0.0
    if all(s in (0.0, 1.0) for s in scores):
        low, high = wilson(round(sum(scores)), n)
        return Estimate(mean, low, high, n)
    rng = random.Random(seed)
    means = [sum(rng.choices(scores, k=n)) / n for _ in range(BOOTSTRAP_RESAMPLES)]
    return Estimate(mean, *percentile_interval(means), n)


def mean_of_means(groups: Sequence[Sequence[float]]) -> float:
    """The mean over the non-empty groups of each group's mean (0 if none has a score)."""
    parts = [g for g in groups if g]
    return sum(sum(g) / len(g) for g in parts) / len(parts) if parts else 0.0


def average(groups: Sequence[Sequence[float]], seed: int = 0) -> Estimate:
    """The mean over groups (tasks) of each group's mean score, with a stratified bootstrap
    interval (each group resampled on its own); one group: its own `estimate`."""
    groups = [g for g in groups if g]
    if not groups:
        return Estimate(0.0, 0.0, 1.0, 0)
    if len(groups) == 1:
        return estimate(groups[0], seed)
    rng = random.Random(seed)
    means = [
        mean_of_means([rng.choices(g, k=len(g)) for g in groups])
        for _ in range(BOOTSTRAP_RESAMPLES)
    ]
    return Estimate(mean_of_means(groups), *percentile_interval(means),
                    sum(len(g) for g in groups))
