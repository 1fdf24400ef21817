"""Per-layer token budgets: split one global budget over the layers, block-aligned.

The global budget is `Budget.tokens_per_layer(n) * num_layers`. A split is chosen in two
steps shared by every policy:

1. `water_fill`: a continuous allocation proportional to per-layer weights (uniform, pyramid,
   entropy), clamped per layer and re-normalised so it still sums to the global budget.
2. `round_to_blocks`: each layer to a whole number of KV blocks (vLLM frees whole blocks),
   with largest-remainder rounding so the total stays exact.

Per-layer rules after rounding: a multiple of `block_size`, except a layer may hold exactly
`n` (the prompt's last block is partial); never above `n`; never below the sink + recent
floor (rounded up to a block). Consequences: a prompt shorter than a block, or shorter than
sink + recent, is kept whole; the total equals the global budget whenever that is a whole
number of blocks (and the floors allow it), and is otherwise the nearest whole number of
blocks (within block_size / 2 of it in practice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from vllm_entropy_kv.policies.base import Budget


def layer_floor(n: int, budget: Budget) -> int:
    """The fewest tokens a layer may keep: the sinks and the recent window (at most n)."""
    return min(n, budget.sink_tokens + budget.recent_tokens)


def total_budget(budget: Budget, n: int, num_layers: int) -> int:
    """The global budget in tokens over all layers of an n-token prompt."""
    return budget.tokens_per_layer(n) * num_layers


def _block_bounds(n: int, budget: Budget) -> tuple[int, int, int]:
    """(block size, fewest blocks, most blocks) a layer may hold."""
    block = max(1, budget.block_size)
    most = math.ceil(n / block)
    fewest = min(most, math.ceil(layer_floor(n, budget) / block))
    return block, fewest, most


def _tokens(blocks: int, block: int, n: int) -> int:
    return min(blocks * block, n)


def round_to_blocks(alloc: Sequence[float] | torch.Tensor, n: int, budget: Budget) -> list[int]:
    """Round a continuous per-layer allocation (tokens) to block-aligned budgets.

    Largest remainder in block units keeps sum(result) equal to sum(alloc) whenever that is a
    whole number of blocks. The last, partial block of the prompt counts as one block unit
    worth `n % block_size` tokens, so a layer allotted all n tokens gets exactly n.
    """
    block, fewest, most = _block_bounds(n, budget)
    full = n // block
    partial = n - full * block
    x = torch.as_tensor(alloc, dtype=torch.float64).clamp(0, n)
    # Tokens -> block units; piecewise linear so that n maps to `most` exactly.
    units = x / block
    if partial:
        tail = full + (x - full * block) / partial
        units = torch.where(x > full * block, tail, units)
    units = units.clamp(fewest, most)
    target = math.floor(float(units.sum()) + 0.5)
    # 1e-9 absorbs float error, so that 2.9999999999 blocks counts as 3.
    base = torch.floor(units + 1e-9).clamp(fewest, most)
    frac = (units - base).clamp_min(0)
    blocks = [int(b) for b in base]
    extra = target - sum(blocks)
    # Ties go to the lower layer, for determinism.
    order = sorted(range(len(blocks)), key=lambda i: (-float(frac[i]), i))
    for i in order:
        if extra <= 0:
            break
        if blocks[i] < most:
            blocks[i] += 1
            extra -= 1
    if partial:
        _settle_partial_blocks(blocks, order, float(x.sum()), block, n, fewest, most)
    return [_tokens(b, block, n) for b in blocks]


def _settle_partial_blocks(
    blocks: list[int], order: list[int], target: float, block: int, n: int, fewest: int, most: int
) -> None:
    """Nudge single layers by one block while that brings the token total nearer the target.

    Block units are exact tokens except a layer's last, partial block (n % block tokens), so
    largest remainder alone can land up to a block off when some layers hold all n tokens.
    """
    total = sum(_tokens(b, block, n) for b in blocks)
    for _ in range(4 * len(blocks)):
        best: tuple[float, int, int] | None = None
        gap = abs(total - target)
        # Grow the layers with the largest remainders first, shrink the smallest first.
        moves = [(i, 1) for i in order] + [(i, -1) for i in reversed(order)]
        for i, step in moves:
            new = blocks[i] + step
            if not fewest <= new <= most:
                continue
            new_total = total - _tokens(blocks[i], block, n) + _tokens(new, block, n)
            new_gap = abs(new_total - target)
            if new_gap < gap - 1e-9 and (best is None or new_gap < best[0] - 1e-9):
                best = (new_gap, i, step)
        if best is None:
            return
        _, i, step = best
        total += _tokens(blocks[i] + step, block, n) - _tokens(blocks[i], block, n)
        blocks[i] += step


def water_fill(
    weights: Sequence[float] | torch.Tensor, total: float, lower: float, upper: float
) -> torch.Tensor:
    """x_l = clamp(c * w_l, lower, upper) with c such that sum(x) = total (when feasible).

    Clamped layers hand their excess or deficit to the others, so the shape follows the
    weights wherever the clamps allow. Zero or negative weights get `lower`.
    """
    w = torch.as_tensor(weights, dtype=torch.float64).clamp_min(0)
    num = w.numel()
    if num == 0:
        return w
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    upper = max(upper, lower)
    if total <= num * lower:
        return torch.full_like(w, lower)
    if total >= num * upper:
        return torch.full_like(w, upper)
    positive = w[w > 0]
    lo_c, hi_c = 0.0, upper / float(positive.min())
    # sum(clamp(c w)) is monotone in c: bisection converges to float precision.
    for _ in range(100):
        mid = 0.5 * (lo_c + hi_c)
        if float((mid * w).clamp(lower, upper).sum()) < total:
            lo_c = mid
        else:
            hi_c = mid
    return (hi_c * w).clamp(lower, upper)


def proportional_budgets(
    weights: Sequence[float] | torch.Tensor,
    budget: Budget,
    n: int,
    *,
    min_fraction: float = 0.0,
    max_fraction: float = 1.0,
) -> list[int]:
    """Split the global budget in proportion to `weights` (one per layer), block-aligned.

    min_fraction, max_fraction: per-layer clamps as fractions of n. They shape the split but
    yield to the global total: when they cannot both hold, the total wins (the clamps relax
    to the hard bounds: the sink + recent floor and n).
    """
    num_layers = len(weights)
    block, fewest, _ = _block_bounds(n, budget)
    hard_lower = float(_tokens(fewest, block, n))
    lower = max(hard_lower, min_fraction * n)
    upper = max(lower, min(float(n), max_fraction * n))
    total = float(total_budget(budget, n, num_layers))
    if total < num_layers * lower:
        lower = hard_lower
    if total > num_layers * upper:
        upper = float(n)
    return round_to_blocks(water_fill(weights, total, lower, upper), n, budget)


def uniform_budgets(budget: Budget, n: int, num_layers: int) -> list[int]:
    """Every layer the same share (up to block rounding)."""
    return proportional_budgets([1.0] * num_layers, budget, n)


def pyramid_weights(num_layers: int, beta: float = 20.0) -> torch.Tensor:
    """PyramidKV's linear schedule: the top layer gets 1/beta of the mean, the bottom layer
    2 - 1/beta of it, the layers in between on a straight line (mean exactly 1)."""
    if num_layers == 1:
        return torch.ones(1, dtype=torch.float64)
    top = 1.0 / beta
    bottom = 2.0 - top
    return torch.linspace(bottom, top, num_layers, dtype=torch.float64)


def pyramid_budgets(budget: Budget, n: int, num_layers: int, beta: float = 20.0) -> list[int]:
    """PyramidKV (Cai et al. 2024): budgets decreasing linearly from the lowest layer up."""
    return proportional_budgets(pyramid_weights(num_layers, beta), budget, n)


def entropy_weights(
    entropies: Sequence[float] | torch.Tensor, exponent: float = 1.0
) -> torch.Tensor:
    """Budget weights from layer entropies: H ** exponent. exponent 0 is uniform; larger
    exponents widen the gap between broad (high-entropy) and sink-like layers."""
    h = torch.as_tensor(entropies, dtype=torch.float64).clamp_min(0)
    return h.pow(exponent)


def entropy_budgets(
    entropies: Sequence[float] | torch.Tensor,
    budget: Budget,
    n: int,
    *,
    exponent: float = 1.0,
    min_fraction: float = 0.0,
    max_fraction: float = 1.0,
) -> list[int]:
    """The entropy paper: a layer's budget grows with its attention entropy."""
    return proportional_budgets(
        entropy_weights(entropies, exponent),
        budget,
        n,
        min_fraction=min_fraction,
        max_fraction=max_fraction,
    )


def layer_budgets(
    allocation: str,
    budget: Budget,
    n: int,
    num_layers: int,
    entropies: Sequence[float] | torch.Tensor | None = None,
) -> list[int]:
    """Budgets by name ("uniform", "pyramid", "entropy"), for policies that let users pick."""
    if allocation == "uniform":
        return uniform_budgets(budget, n, num_layers)
    if allocation == "pyramid":
        return pyramid_budgets(budget, n, num_layers)
    if allocation == "entropy":
        if entropies is None:
            raise ValueError("entropy allocation needs the layer entropies")
        return entropy_budgets(entropies, budget, n)
    raise ValueError(f"allocation must be 'uniform', 'pyramid' or 'entropy', got {allocation!r}")


__all__ = [
    "entropy_budgets",
    "entropy_weights",
    "layer_budgets",
    "layer_floor",
    "proportional_budgets",
    "pyramid_budgets",
    "pyramid_weights",
    "round_to_blocks",
    "total_budget",
    "uniform_budgets",
    "water_fill",
]
