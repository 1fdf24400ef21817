"""Recorded plans of every registered policy on seeded random observations.

`python tests/policies/planning_golden.py` writes tests/data/planning_golden.pt from the
policies as they are; test_batched.py plans the same inputs again and compares. The file was
recorded before planning was batched over layers, so the test pins that refactor down.

Stored per (case, policy): each layer's keep set as a packed bit mask, its layer entropy, and
its summaries: counts in full, keys and values in full for small cases and otherwise as
projections onto a few fixed random directions (keeps the file under 2 MB).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from vllm_entropy_kv.policies import Budget, LayerObservation, LayerPlan, Rope, get_policy

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "planning_golden.pt"

# Embedded-model-like layers (SmolLM2-135M: 30 layers, 9 query heads, 3 KV heads, d 64).
SHAPE = {"num_layers": 30, "q_heads": 9, "kv_heads": 3, "head_size": 64}
CASES: list[dict[str, Any]] = [
    {"n": 100, "window": 16, "offset": 0, "block": 1, "keep": 0.25, "dtype": "float32"},
    {"n": 700, "window": 32, "offset": 0, "block": 32, "keep": 0.1, "dtype": "float32"},
    {"n": 700, "window": 16, "offset": 5, "block": 1, "keep": 0.5, "dtype": "float32"},
    {"n": 700, "window": 16, "offset": 0, "block": 32, "keep": 0.25, "dtype": "bfloat16"},
    {"n": 3000, "window": 16, "offset": 0, "block": 32, "keep": 0.25, "dtype": "float32"},
    {"n": 3000, "window": 32, "offset": 20, "block": 32, "keep": 0.1, "dtype": "float32"},
]
# Every registered policy with its defaults, plus the parameters that switch code paths.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("entropy", {}),
    ("entropy", {"group_reduce": "max", "reach": 1, "chunk_size": 1}),
    ("entropy-merge", {}),
    ("expected-attention", {}),
    ("expected-attention", {"use_covariance": False, "use_vnorm": False, "chunk_size": 32}),
    ("h2o", {}),
    ("none", {}),
    ("pyramid", {}),
    ("random", {}),
    ("snapkv", {}),
    ("snapkv", {"pooling": "max", "group_reduce": "sum"}),
    ("src", {}),
    ("src", {"allocation": "entropy"}),
    ("streaming", {}),
    ("topk", {}),
]
FULL_SUMMARIES_UP_TO = 100  # prompt length up to which summaries are stored whole
PROJECTIONS = 4


def case_layers(index: int, case: dict[str, Any]) -> tuple[list[LayerObservation], Budget]:
    """Seeded observations of one case: per-layer query sharpness spreads the entropies."""
    gen = torch.Generator().manual_seed(1000 + index)
    d, dtype = SHAPE["head_size"], getattr(torch, case["dtype"])
    rope = Rope.from_theta(10000.0, d, 1024)
    layers = []
    for layer in range(SHAPE["num_layers"]):
        sharp = 0.5 + 2.5 * layer / SHAPE["num_layers"]
        q = torch.randn(SHAPE["q_heads"], case["window"], d, generator=gen) * sharp
        k = torch.randn(SHAPE["kv_heads"], case["n"], d, generator=gen)
        v = torch.randn(SHAPE["kv_heads"], case["n"], d, generator=gen)
        layers.append(LayerObservation(q.to(dtype), k.to(dtype), v.to(dtype), d**-0.5,
                                       query_offset=case["offset"], rope=rope))
    budget = Budget(keep=case["keep"], sink_tokens=4, recent_tokens=32, block_size=case["block"])
    return layers, budget


def variant_key(name: str, params: dict[str, Any]) -> str:
    return name + "".join(f" {k}={v}" for k, v in sorted(params.items()))


def _directions(d: int) -> torch.Tensor:
    return torch.randn(d, PROJECTIONS, generator=torch.Generator().manual_seed(7))


def summary_record(plans: list[LayerPlan], n: int) -> dict[str, torch.Tensor]:
    """Summary keys/values (whole, or projected) and counts of every layer, concatenated."""
    parts: dict[str, list[torch.Tensor]] = {"keys": [], "values": [], "counts": []}
    for plan in plans:
        if plan.summary_keys is None or plan.summary_values is None:
            continue
        for name, tensor in (("keys", plan.summary_keys), ("values", plan.summary_values)):
            t = tensor.float()
            parts[name].append(t if n <= FULL_SUMMARIES_UP_TO else t @ _directions(t.shape[-1]))
        counts = plan.summary_counts
        parts["counts"].append(counts if counts is not None else torch.ones(plan.num_summaries))
    return {k: torch.cat([p.flatten() for p in v]) if v else torch.empty(0) for k, v in parts.items()}


def plan_record(plans: list[LayerPlan], n: int) -> dict[str, torch.Tensor]:
    masks = torch.zeros(len(plans), n, dtype=torch.bool)
    for i, plan in enumerate(plans):
        masks[i, plan.keep] = True
    return {
        "keep_mask": pack_bits(masks),
        "num_summaries": torch.tensor([p.num_summaries for p in plans]),
        "layer_entropy": torch.tensor(
            [float("nan") if p.layer_entropy is None else p.layer_entropy for p in plans],
            dtype=torch.float64,
        ),
        **summary_record(plans, n),
    }


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[L, n] bool -> [L, ceil(n / 8)] uint8."""
    n = mask.shape[1]
    padded = torch.zeros(mask.shape[0], -(-n // 8) * 8, dtype=torch.uint8)
    padded[:, :n] = mask.to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (padded.view(mask.shape[0], -1, 8) * weights).sum(-1).to(torch.uint8)


def record_all() -> dict[str, Any]:
    out: dict[str, Any] = {"cases": CASES, "plans": {}}
    for index, case in enumerate(CASES):
        layers, budget = case_layers(index, case)
        for name, params in VARIANTS:
            plans = get_policy(name, **params).plan(layers, budget)
            out["plans"][(index, variant_key(name, params))] = plan_record(plans, case["n"])
    return out


if __name__ == "__main__":
    torch.save(record_all(), GOLDEN)
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)", file=sys.stderr)
