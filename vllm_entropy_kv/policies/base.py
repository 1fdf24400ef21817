"""The contract between compression policies and their two callers.

The offline harness (`vllm_entropy_kv.eval`, HF transformers) and the engine
(`vllm_entropy_kv.engine`, inside vLLM's worker) both build one `LayerObservation` per
layer at the end of a request's prefill, call `KVPolicy.plan(...)`, and apply the returned
`LayerPlan`s to their own cache. Nothing here imports vLLM.

Shapes: `Hq` query heads, `Hkv` KV heads (`Hq % Hkv == 0`, GQA), `n` prompt tokens,
`W` observation-window queries (the last `W` prompt positions), `d` head size.
Keys and queries are after RoPE.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_entropy_kv.policies.shards import HeadShard


@dataclass(frozen=True)
class Budget:
    """How much of a prompt's KV cache to keep, shared by every policy.

    keep: a fraction of the prompt in (0, 1], or, when > 1, a token count per layer
        (averaged over layers for policies that vary it per layer).
    sink_tokens: the first tokens, always kept (attention sinks, StreamingLLM).
    recent_tokens: the last prompt tokens, always kept (the observation window's own tokens).
    block_size: per-layer budgets are rounded to multiples of this (vLLM's KV block size),
        keeping the total over layers exact; 1 disables rounding.
    """

    keep: float
    sink_tokens: int = 4
    recent_tokens: int = 32
    block_size: int = 1

    def tokens_per_layer(self, num_tokens: int) -> int:
        """The average number of tokens a layer may hold for an `num_tokens` prompt."""
        wanted = round(self.keep * num_tokens) if self.keep <= 1 else int(self.keep)
        floor = min(num_tokens, self.sink_tokens + self.recent_tokens)
        return max(floor, min(num_tokens, wanted))


@dataclass(frozen=True)
class Rope:
    """The model's rotary position embedding (RoPE) as rotations by relative offset, for
    policies that move a query to other positions (`expected_attention.py`). The pairing is
    the GPT-NeoX one that Llama-family models use: dim i turns with dim i + r/2, for the
    first r dims of a head (partial rotary leaves the rest alone).

    cos, sin: [M, r/2] cos(o * theta_i) and sin(o * theta_i) for offsets o = 0..M-1, times
        any scale the model applies to both (YaRN's, for example).
    """

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def from_inverse_frequencies(
        cls, inv_freq: torch.Tensor, max_offset: int, scale: float = 1.0
    ) -> Rope:
        """From the model's inverse frequencies theta_i ([r/2]), for offsets below
        `max_offset`."""
        angles = torch.outer(torch.arange(max_offset, dtype=torch.float64),
                             inv_freq.to(torch.float64))
        return cls((angles.cos() * scale).float(), (angles.sin() * scale).float())

    @classmethod
    def from_theta(cls, theta: float, rotary_dim: int, max_offset: int) -> Rope:
        """Plain RoPE with base `theta` over `rotary_dim` dims (no scaling)."""
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
        return cls.from_inverse_frequencies(theta ** -exponents, max_offset)

    @property
    def max_offset(self) -> int:
        return self.cos.shape[0]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`x` [..., d] turned by the angles whose cosines and sines are `cos`, `sin`
        ([..., r/2], broadcast against x's leading dims); the rotation is linear in them, so
        averaged cosines and sines give the averaged rotation."""
        half = cos.shape[-1]
        x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


@dataclass
class LayerObservation:
    """What one attention layer saw during prefill.

    queries: [Hq, W, d] the last W prompt queries (W may be smaller than n).
    keys, values: [Hkv, n, d] the prompt's keys and values, in any dtype and strides; scoring
        reads keys fastest in float32 with positions contiguous (`[Hkv, d, n]` storage), as
        the engine reads them back. `values` may be None for a policy that does not read them
        (`KVPolicy.reads_values`): the engine then reads back only the kept tokens' values.
    scale: the softmax scale the model uses (usually d ** -0.5).
    query_offset: how many positions the last query lies beyond the last key. 0: the queries
        are the last W of the n positions. The engine compresses only a prompt's whole
        blocks but observes the prompt's true last queries (where the question is), which
        then follow the keys; a query sees every key at or before its position.
    shard: with tensor parallelism, this process's share of the heads (the tensors hold
        only those) and how to exchange statistics with the other shards (`shards.py`);
        None when the tensors hold every head.
    rope: the model's RoPE, for policies that need it (None: not given).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor | None
    scale: float
    query_offset: int = 0
    shard: HeadShard | None = None
    rope: Rope | None = None

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]


@dataclass
class LayerPlan:
    """What one layer keeps.

    keep: sorted, unique prompt indices (int64) whose K/V stay, shared by all heads.
    summary_keys, summary_values: [Hkv, s, d] synthetic tokens (merged or reconstructed)
        appended after the kept ones, or None; with a `HeadShard`, the shard's own KV heads.
    summary_counts: [s] how many prompt tokens each synthetic token stands for; attention
        adds log(count) to its score so it keeps its mass (Attention Matching). None means 1.
    layer_entropy: the layer's attention entropy in [0, 1] if the policy measured it
        (reported in metrics; nobody recomputes it).
    """

    keep: torch.Tensor
    summary_keys: torch.Tensor | None = None
    summary_values: torch.Tensor | None = None
    summary_counts: torch.Tensor | None = None
    layer_entropy: float | None = None

    @property
    def num_summaries(self) -> int:
        return 0 if self.summary_keys is None else self.summary_keys.shape[1]

    @property
    def num_physical(self) -> int:
        """Tokens this layer holds after compression."""
        return self.keep.numel() + self.num_summaries


class KVPolicy(abc.ABC):
    """A compression method. Subclasses are small dataclasses registered by `name`."""

    name: ClassVar[str]

    #: How many of the last prompt queries the policy wants in `LayerObservation.queries`:
    #: 32 by default (the observation window), None for every prompt query (H2O), 0 for none
    #: (position-only policies). Callers may pass more; policies use the last ones they want.
    #: A class default that dataclass policies may turn into a field of the same name.
    observation_queries: int | None = 32

    #: Whether `plan` reads `LayerObservation.values` (to merge or reconstruct them). A
    #: policy that only selects does not, and the engine then reads back the values of its
    #: moved kept tokens only, not half of the prompt's cache.
    reads_values: ClassVar[bool] = False

    @abc.abstractmethod
    def plan(self, layers: list[LayerObservation], budget: Budget) -> list[LayerPlan]:
        """Decide, for every layer, which tokens stay and which synthetic tokens are added."""
