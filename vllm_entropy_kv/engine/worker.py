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
block stays in place because decode appends to it at logical slots. The observation window
is still the prompt's true last queries (`LayerObservation.query_offset`): that is where a
question after a long context sits, and it may lie entirely in the partial block.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.logger import init_logger

from vllm_entropy_kv.config import KVPolicyConfig, KVPolicyConfigError
from vllm_entropy_kv.metrics import EntropyKVStats
from vllm_entropy_kv.engine.cache_layout import (
    cache_layout,
    request_amx_permission,
    write_tokens,
)
from vllm_entropy_kv.policies import LayerObservation, LayerPlan
from vllm_entropy_kv.policies.stats import compressed_kv

logger = init_logger(__name__)

BlockRange = tuple[int, int]


@dataclass
class CaptureRequest:
    """A batch row whose prompt is prefilled in this step and will be compressed."""

    req_id: str
    token_start: int
    num_tokens: int  # compressible prefix: whole blocks only
    block_ids: torch.Tensor  # this layer's logical block row for the request
    config: KVPolicyConfig  # the server's settings with the request's own on top
    prompt_tokens: int  # the whole prompt; its last queries observe (the question is there)


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
    config: KVPolicyConfig
    layers: dict[int, CapturedLayer] = field(default_factory=dict)


@dataclass
class CompressionReport:
    """What the worker did to one request: per layer, the block range it no longer reads."""

    policy: str
    num_tokens: int
    kept_tokens: dict[int, int]
    freed_ranges: dict[int, BlockRange]
    seconds: float
    # Stats only (metrics): tokens in the cache when compressed (the prompt; the tail beyond
    # `num_tokens` stays in place), and each layer's entropy if the policy computed it.
    prompt_tokens: int = 0
    layer_entropy: dict[int, float] = field(default_factory=dict)
    summaries: dict[int, tuple[int, int]] = field(default_factory=dict)  # (slots, merged)


class CompressionWorker:
    """Per-worker-process state shared by the backend, the metadata builder and the
    connector (they are created separately by vLLM, so they meet here)."""

    def __init__(self) -> None:
        self.config: KVPolicyConfig | None = None  # the server's defaults
        self.block_size = 0
        self.num_layers = 0
        self._runner: weakref.ref[Any] | None = None
        self.freed: dict[str, dict[int, BlockRange]] = {}
        self.log_bias: dict[str, dict[int, torch.Tensor]] = {}
        self.pending: dict[str, PendingCompression] = {}
        self.request_configs: dict[str, KVPolicyConfig] = {}
        self.reports: dict[str, CompressionReport] = {}
        self.stats = EntropyKVStats()

    def configure(self, config: KVPolicyConfig, block_size: int, num_layers: int) -> None:
        self.config = config
        self.block_size = block_size
        self.num_layers = num_layers
        # Compaction runs vLLM's CPU cache ops in this process (vLLM's worker asks too).
        request_amx_permission()

    @property
    def enabled(self) -> bool:
        """Whether the server set up compression (a request may still choose `none`)."""
        return self.config is not None and self.config.enabled

    def bind_runner(self, runner: Any) -> None:
        self._runner = weakref.ref(runner)

    def batch_req_ids(self, num_reqs: int) -> list[str]:
        runner = self._runner() if self._runner is not None else None
        if runner is None:
            raise RuntimeError("vllm-entropy-kv: the model runner was not bound")
        return list(runner.input_batch.req_ids[:num_reqs])

    def request_config(self, req_id: str) -> KVPolicyConfig:
        """The server's settings with the request's `kv_*` extra args on top. The API server
        answers invalid ones with HTTP 400; a request that reaches the engine some other way
        with invalid settings gets the server's, with a warning, rather than failing the batch.
        """
        assert self.config is not None
        # Every layer's metadata builder asks; a request's settings never change.
        if (known := self.request_configs.get(req_id)) is not None:
            return known
        params = getattr(self._request_state(req_id), "sampling_params", None)
        try:
            config = self.config.for_request(getattr(params, "extra_args", None))
        except KVPolicyConfigError as e:
            logger.warning("vllm-entropy-kv: %s: %s; using the server's settings", req_id, e)
            config = self.config
        self.request_configs[req_id] = config
        return config

    def min_tokens_to_compress(self, config: KVPolicyConfig) -> int:
        """Prompts shorter than this are left alone: nothing could be freed."""
        floor = config.sink_tokens + config.recent_tokens
        return max(2 * self.block_size, floor + self.block_size)

    def compressible_tokens(self, prompt_tokens: int, config: KVPolicyConfig) -> int:
        """Whole blocks of the prompt; 0 if the request should not be compressed."""
        if not config.enabled:
            return 0
        num_tokens = prompt_tokens // self.block_size * self.block_size
        return num_tokens if num_tokens >= self.min_tokens_to_compress(config) else 0

    def forget(self, req_id: str) -> None:
        """Drop a request's compaction state (it is recomputed from scratch after preemption)."""
        self.freed.pop(req_id, None)
        self.log_bias.pop(req_id, None)
        self.pending.pop(req_id, None)

    def finish(self, req_id: str) -> None:
        """Drop all state of a finished request."""
        self.forget(req_id)
        self.request_configs.pop(req_id, None)

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
        start, n, end = request.token_start, request.num_tokens, request.prompt_tokens
        window = min(request.config.window, end)
        observation = LayerObservation(
            queries=query[start + end - window : start + end].transpose(0, 1).contiguous(),
            keys=key[start : start + n].transpose(0, 1).contiguous(),
            values=value[start : start + n].transpose(0, 1).contiguous(),
            scale=scale,
            query_offset=end - n,
        )
        pending = self.pending.setdefault(
            request.req_id, PendingCompression(n, request.config)
        )
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
            started = time.perf_counter()
            report, log_bias = self._compact_request(request)
            report.seconds = time.perf_counter() - started
            self.freed[req_id] = report.freed_ranges
            if log_bias:
                self.log_bias[req_id] = log_bias
            self.reports[req_id] = report
            self._record_stats(req_id, report)

    def _compact_request(
        self, request: PendingCompression
    ) -> tuple[CompressionReport, dict[int, torch.Tensor]]:
        """Plan and write one request; returns its report and, per layer with biased summary
        tokens, the log(count) bias of its first slots (kept in the worker, never sent)."""
        config = request.config
        # Built from all of the request's settings (window, reach, ...), cached per value.
        policy = config.make_policy()
        layer_ids = sorted(request.layers)
        captured = [request.layers[i] for i in layer_ids]
        plans = policy.plan([c.observation for c in captured], config.budget_for(self.block_size))
        block, n = self.block_size, request.num_tokens
        kept: dict[int, int] = {}
        freed: dict[int, BlockRange] = {}
        log_bias: dict[int, torch.Tensor] = {}
        for layer_idx, cap, plan in zip(layer_ids, captured, plans):
            m = plan.num_physical
            kept[layer_idx] = m
            if m % block or m > n:
                raise ValueError(f"layer {layer_idx}: plan keeps {m} tokens, not a whole "
                                 f"number of {block}-token blocks within {n}")
            # Kept tokens in prompt order, then the summaries: the layer's new first m slots.
            # A plan that keeps every token goes the same way (an identity rewrite of its
            # slots) and frees the empty range (n // block, n // block).
            keys, values, bias = compressed_kv(cap.observation, plan)
            positions = torch.arange(m)
            slots = cap.block_ids[positions // block].to(torch.int64) * block + positions % block
            write_tokens(
                cap.kv_cache, keys.transpose(0, 1), values.transpose(0, 1), slots,
                cap.layer.isa, k_scale=cap.layer._k_scale_float,
                v_scale=cap.layer._v_scale_float, kv_cache_dtype=cap.kv_cache_dtype,
            )
            freed[layer_idx] = (m // block, n // block)
            if config.merge_bias and bool(bias.any()):
                if cache_layout(cap.layer.isa, cap.kv_cache, cap.kv_cache_dtype) is not None:
                    log_bias[layer_idx] = bias
                else:
                    logger.warning_once(
                        "vllm-entropy-kv: summary tokens are served without their log(count) "
                        "bias: a %s KV cache cannot be read back for the biased attention",
                        cap.kv_cache_dtype)
        entropies = {
            layer_idx: plan.layer_entropy
            for layer_idx, plan in zip(layer_ids, plans)
            if plan.layer_entropy is not None
        }
        summaries = {
            layer_idx: (plan.num_summaries, _merged_tokens(plan))
            for layer_idx, plan in zip(layer_ids, plans)
            if plan.num_summaries and plan.num_physical < n
        }
        report = CompressionReport(config.policy, n, kept, freed, seconds=0.0,
                                   layer_entropy=entropies, summaries=summaries)
        return report, log_bias

    def _request_state(self, req_id: str) -> Any:
        """The runner's `CachedRequestState` of a request, or None."""
        runner = self._runner() if self._runner is not None else None
        return getattr(runner, "requests", {}).get(req_id) if runner is not None else None

    def _record_stats(self, req_id: str, report: CompressionReport) -> None:
        """Metrics only: what this compression did, for the connector's stats."""
        # Before sampling, the runner's request holds exactly the tokens just prefilled.
        state = self._request_state(req_id)
        report.prompt_tokens = max(getattr(state, "num_tokens", 0), report.num_tokens)
        self.stats.record_compression(
            report.policy, report.prompt_tokens, report.num_tokens, report.kept_tokens,
            report.seconds, report.layer_entropy, report.summaries,
        )

    def take_stats(self) -> EntropyKVStats | None:
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, EntropyKVStats()
        return stats

    def take_reports(self) -> dict[str, CompressionReport]:
        reports, self.reports = self.reports, {}
        return reports


def _merged_tokens(plan: LayerPlan) -> int:
    """Prompt tokens a plan's summaries stand for (one each when it gives no counts)."""
    if plan.summary_counts is None:
        return plan.num_summaries
    return int(plan.summary_counts.sum())


_WORKER = CompressionWorker()


def compression_worker() -> CompressionWorker:
    return _WORKER
