"""Synthetic prefill observations for the policy tests (pure torch, no model)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from vllm_entropy_kv.policies import Budget, LayerObservation, LayerPlan, Rope

MakeLayers = Callable[..., list[LayerObservation]]


def _make_layers(
    num_layers: int = 4,
    q_heads: int = 4,
    kv_heads: int = 2,
    head_size: int = 16,
    n: int = 200,
    window: int = 32,
    seed: int = 0,
    sharpness: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[LayerObservation]:
    """Random layers; `sharpness[l]` scales layer l's queries (larger = lower entropy)."""
    gen = torch.Generator().manual_seed(seed)
    sharp = list(sharpness) if sharpness is not None else [1.0 + i for i in range(num_layers)]
    rope = Rope.from_theta(10000.0, head_size, 1024)
    layers = []
    for layer in range(num_layers):
        q = torch.randn(q_heads, window, head_size, generator=gen) * sharp[layer]
        k = torch.randn(kv_heads, n, head_size, generator=gen)
        v = torch.randn(kv_heads, n, head_size, generator=gen)
        layers.append(LayerObservation(q.to(dtype), k.to(dtype), v.to(dtype), head_size**-0.5,
                                       rope=rope))
    return layers


@pytest.fixture
def make_layers() -> MakeLayers:
    return _make_layers


def assert_valid_plan(plan: LayerPlan, n: int) -> None:
    """keep: sorted, unique, int64, in [0, n)."""
    keep = plan.keep
    assert keep.dtype == torch.int64
    assert keep.dim() == 1
    if keep.numel():
        assert int(keep.min()) >= 0 and int(keep.max()) < n
        assert bool((keep[1:] > keep[:-1]).all()), "keep must be sorted and unique"


@pytest.fixture
def valid_plan() -> Callable[[LayerPlan, int], None]:
    return assert_valid_plan


@pytest.fixture
def budget() -> Budget:
    return Budget(keep=0.25, sink_tokens=4, recent_tokens=16, block_size=16)
