"""Worker-side compression: capture each layer's prefill, plan with the policy, compact.

Timeline of one request, all in the worker process:
1. The step that computes the request from position 0 (whole-prompt prefill; chunked prefill
   is off when a policy is on): every layer's backend `forward` hands its queries, keys and
   values to `CompressionWorker.capture`.
2. After the forward (`wait_for_save` of the connector), `compact` runs the policy over all
   layers, writes each layer's kept tokens to the front of its blocks with the layout-safe
   cache op, and records the logical block range `[first, last)` that layer no longer reads.
3. Later steps: the metadata builder gives the kernel a virtual block-table row without that
   range and a physical sequence length; positions and slot mapping stay logical.
The scheduler hears of each range through the connector and returns the blocks to the pool.

Only the compressible prefix (whole blocks) is planned; the partially filled last prompt
block stays in place because decode appends to it at logical slots.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_entropy_kv.config import KVPolicyConfig
from vllm_entropy_kv.metrics import EntropyKVStats
from vllm_entropy_kv.policies import KVPolicy, LayerObservation, get_policy

logger = logging.getLogger(__name__)

BlockRange = tuple[int, int]


@dataclass
class CaptureRequest:
    """A batch row whose prompt is prefilled in this step and will be compressed."""

    req_id: str
    token_start: int
    num_tokens: int  # compressible prefix: whole blocks only
    block_ids: torch.Tensor  # this layer's logical block row for the request


@dataclass
class CapturedLayer:
    observation: LayerObservation
    block_ids: torch.Tensor
    kv_cache: torch.Tensor
    layer: Any  # the vLLM attention layer: its ISA tag and KV scales drive the cache op
    kv_cache_dtype: str


@dataclass
class PendingCompression:
    num_tokens: int
    layers: dict[int, CapturedLayer] = field(default_factory=dict)


@dataclass
class CompressionReport:
    """What the worker did to one request: per layer, the block range it no longer reads."""

    num_tokens: int
    kept_tokens: dict[int, int]
    freed_ranges: dict[int, BlockRange]
    seconds: float
    # Stats only (metrics): tokens in the cache when compressed (the prompt; the tail beyond
    # `num_tokens` stays in place), and each layer's entropy if the policy computed it.
    prompt_tokens: int = 0
    layer_entropy: dict[int, float] = field(default_factory=dict)


class EntropyTap:
    """Keeps the per-layer attention entropies a scoring policy computes anyway (the entropy
    policy scores with `attention_stats(entropy=True)`), for the metrics; wraps the policy
    instance's `score` and changes nothing it returns. Policies that do not compute entropy
    report none: recomputing it would cost about as much as their whole plan."""

    def __init__(self) -> None:
        self.values: dict[int, float] = {}

    def install(self, policy: KVPolicy) -> None:
        score = getattr(policy, "score", None)
        if score is None:
            return

        def tapped(obs: LayerObservation, layer_idx: int):
            scores = score(obs, layer_idx)
            stats = getattr(scores, "stats", None)
            if stats is not None and getattr(stats, "head_entropy", None) is not None:
                self.values[layer_idx] = stats.layer_entropy
            return scores

        policy.score = tapped  # type: ignore[method-assign]

    def take(self) -> dict[int, float]:
        values, self.values = self.values, {}
        return values


class CompressionWorker:
    """Per-worker-process state shared by the backend, the metadata builder and the
    connector (they are created separately by vLLM, so they meet here)."""

    def __init__(self) -> None:
        self.config: KVPolicyConfig | None = None
        self.policy: KVPolicy | None = None
        self.block_size = 0
        self.num_layers = 0
        self._runner: weakref.ref[Any] | None = None
        self.freed: dict[str, dict[int, BlockRange]] = {}
        self.pending: dict[str, PendingCompression] = {}
        self.reports: dict[str, CompressionReport] = {}
        self.stats = EntropyKVStats()
        self.entropy_tap = EntropyTap()

    def configure(self, config: KVPolicyConfig, block_size: int, num_layers: int) -> None:
        self.config = config
        self.policy = get_policy(config.policy) if config.enabled else None
        if self.policy is not None:
            self.entropy_tap.install(self.policy)
        self.block_size = block_size
        self.num_layers = num_layers

    @property
    def enabled(self) -> bool:
        return self.policy is not None

    def bind_runner(self, runner: Any) -> None:
        self._runner = weakref.ref(runner)

    def batch_req_ids(self, num_reqs: int) -> list[str]:
        runner = self._runner() if self._runner is not None else None
        if runner is None:
            raise RuntimeError("vllm-entropy-kv: the model runner was not bound")
        return list(runner.input_batch.req_ids[:num_reqs])

    def min_tokens_to_compress(self) -> int:
        """Prompts shorter than this are left alone: nothing could be freed."""
        assert self.config is not None
        floor = self.config.sink_tokens + self.config.recent_tokens
        return max(2 * self.block_size, floor + self.block_size)

    def compressible_tokens(self, prompt_tokens: int) -> int:
        """Whole blocks of the prompt; 0 if the request should not be compressed."""
        num_tokens = prompt_tokens // self.block_size * self.block_size
        return num_tokens if num_tokens >= self.min_tokens_to_compress() else 0

    def forget(self, req_id: str) -> None:
        """Drop all state of a request (finished, or recomputed from scratch after preemption)."""
        self.freed.pop(req_id, None)
        self.pending.pop(req_id, None)

    def capture(
        self,
        request: CaptureRequest,
        layer_idx: int,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        scale: float,
        kv_cache_dtype: str,
    ) -> None:
        """Keep what `layer_idx` saw of the request's prompt (copies: vLLM reuses buffers)."""
        assert self.config is not None
        start, n = request.token_start, request.num_tokens
        window = min(self.config.window, n)
        observation = LayerObservation(
            queries=query[start + n - window : start + n].transpose(0, 1).contiguous(),
            keys=key[start : start + n].transpose(0, 1).contiguous(),
            values=value[start : start + n].transpose(0, 1).contiguous(),
            scale=scale,
        )
        pending = self.pending.setdefault(request.req_id, PendingCompression(n))
        pending.layers[layer_idx] = CapturedLayer(
            observation, request.block_ids.clone(), kv_cache, layer, kv_cache_dtype
        )

    def compact(self) -> None:
        """Plan and compact every request captured in this step's forward."""
        pending, self.pending = self.pending, {}
        for req_id, request in pending.items():
            if len(request.layers) != self.num_layers:
                logger.warning("vllm-entropy-kv: %s captured %d of %d layers; not compressed",
                               req_id, len(request.layers), self.num_layers)
                continue
            self.entropy_tap.take()
            started = time.perf_counter()
            report = self._compact_request(request)
            report.seconds = time.perf_counter() - started
            self.freed[req_id] = report.freed_ranges
            self.reports[req_id] = report
            self._record_stats(req_id, request, report)

    def _compact_request(self, request: PendingCompression) -> CompressionReport:
        from vllm import _custom_ops as ops

        assert self.policy is not None and self.config is not None
        layer_ids = sorted(request.layers)
        captured = [request.layers[i] for i in layer_ids]
        plans = self.policy.plan(
            [c.observation for c in captured], self.config.budget_for(self.block_size)
        )
        block, n = self.block_size, request.num_tokens
        kept: dict[int, int] = {}
        freed: dict[int, BlockRange] = {}
        for layer_idx, cap, plan in zip(layer_ids, captured, plans):
            if plan.summary_keys is not None:
                raise NotImplementedError(
                    f"policy {self.policy.name!r} adds summary tokens; the engine serves "
                    "eviction policies only"
                )
            m = plan.num_physical
            kept[layer_idx] = m
            if m % block or m > n:
                raise ValueError(f"layer {layer_idx}: plan keeps {m} tokens, not a whole "
                                 f"number of {block}-token blocks within {n}")
            if m == n:
                continue
            obs = cap.observation
            keys = obs.keys[:, plan.keep].transpose(0, 1).contiguous()
            values = obs.values[:, plan.keep].transpose(0, 1).contiguous()
            positions = torch.arange(m)
            slots = cap.block_ids[positions // block].to(torch.int64) * block + positions % block
            num_blocks, num_kv_heads, block_size, _ = cap.kv_cache.shape
            key_cache, value_cache = cap.kv_cache.view(
                num_blocks, num_kv_heads, block_size * 2, -1
            ).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(
                keys, values, key_cache, value_cache, slots, cap.layer.isa,
                k_scale=cap.layer._k_scale_float, v_scale=cap.layer._v_scale_float,
                kv_cache_dtype=cap.kv_cache_dtype,
            )
            freed[layer_idx] = (m // block, n // block)
        return CompressionReport(n, kept, freed, seconds=0.0)

    def _record_stats(
        self, req_id: str, request: PendingCompression, report: CompressionReport
    ) -> None:
        """Metrics only: what this compression did, for the connector's stats."""
        assert self.config is not None
        runner = self._runner() if self._runner is not None else None
        state = getattr(runner, "requests", {}).get(req_id) if runner is not None else None
        # Before sampling, the runner's request holds exactly the tokens just prefilled.
        report.prompt_tokens = max(getattr(state, "num_tokens", 0), report.num_tokens)
        layer_ids = sorted(request.layers)
        report.layer_entropy = {
            layer_ids[i]: value for i, value in self.entropy_tap.take().items()
            if i < len(layer_ids)
        }
        self.stats.record_compression(
            self.config.policy, report.prompt_tokens, report.num_tokens, report.kept_tokens,
            report.seconds, report.layer_entropy,
        )

    def take_stats(self) -> EntropyKVStats | None:
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, EntropyKVStats()
        return stats

    def take_reports(self) -> dict[str, CompressionReport]:
        reports, self.reports = self.reports, {}
        return reports


_WORKER = CompressionWorker()


def compression_worker() -> CompressionWorker:
    return _WORKER
