"""Compression metrics on vLLM's own `/metrics`, through vLLM's KV-connector stats pipeline.

Path of one number (vLLM 0.32, `distributed/kv_transfer/kv_connector/v1/metrics.py`):

1. Worker process: `CompressionWorker.compact` records what it did to each request (tokens
   kept and evicted, per-layer budgets, the layer entropies the policy computed, compaction
   seconds) into an `EntropyKVStats`; the connector's worker-side `get_kv_connector_stats()`
   hands it to the model runner output after every forward.
2. Engine core: the connector's scheduler side records the blocks it actually returned to the
   pool (and their bytes); vLLM aggregates both sides into `SchedulerStats.kv_connector_stats`
   (a plain dict: it crosses processes as msgpack, so keys are strings, values numbers/lists).
3. API server: `PrometheusStatLogger` calls `EntropyKVConnector.build_prom_metrics(...)` once,
   which creates the collectors below (`EntropyKVPromMetrics`), then `observe(...)` with each
   step's dict. `/metrics` shows the API server's registry only.

Names are `vllm_entropy_kv_*` (not `vllm:`-prefixed, which `PrometheusStatLogger` unregisters
at start-up), in base units, counters end in `_total`, all labelled by `policy` (besides vLLM's
`model_name` and `engine`). Token counts are per request, averaged over layers (layers keep
different numbers of tokens); per-layer detail is in the layer-labelled series.

Also here: `LIVE_TOTALS`, the same numbers summed in the API server for `GET /v1/kv-policy`
(from the shared Prometheus files where vLLM runs several API servers, e.g. one per
data-parallel engine: each server then sees only its own requests' stats), and
`vllm_entropy_kv_info`, a constant-1 series naming the active settings, so that vLLM's
own series (TTFT, time per output token) can be grouped by policy in PromQL:
`... * on(instance) group_left(policy) vllm_entropy_kv_info`.
"""

from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, Gauge
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from vllm_entropy_kv.config import KVPolicyConfig


PREFIX = "vllm_entropy_kv_"


class MetricName:
    """Exposed names (counters as exposed, with `_total`)."""

    REQUESTS = PREFIX + "requests_compressed_total"
    PROMPT_TOKENS = PREFIX + "prompt_tokens_total"
    TOKENS_KEPT = PREFIX + "tokens_kept_total"
    TOKENS_EVICTED = PREFIX + "tokens_evicted_total"
    TOKENS_MERGED = PREFIX + "tokens_merged_total"
    FREED_BLOCKS = PREFIX + "freed_blocks_total"
    FREED_BYTES = PREFIX + "freed_bytes_total"
    CACHED_BLOCKS_RELEASED = PREFIX + "cached_blocks_released_total"
    BLOCKS_KEPT_IN_PLACE = PREFIX + "blocks_kept_in_place_total"
    PREFIX_HIT_TOKENS = PREFIX + "prefix_hit_tokens_total"
    COMPRESSION_RATIO = PREFIX + "compression_ratio"
    LAYER_BUDGET = PREFIX + "layer_budget_ratio"
    ENTROPY = PREFIX + "prefill_attention_entropy_ratio"
    COMPACTION_SECONDS = PREFIX + "compaction_seconds"
    INFO = PREFIX + "info"


# Stats payload keys, one dict per policy: {policy: {key: value}}.
COUNTER_KEYS: tuple[str, ...] = (
    "requests", "prompt_tokens", "tokens_kept", "tokens_evicted", "tokens_merged",
    "freed_blocks", "freed_bytes", "cached_blocks_released", "blocks_kept_in_place",
    "prefix_hit_tokens",
)
COUNTER_METRICS: dict[str, str] = {
    "requests": MetricName.REQUESTS,
    "prompt_tokens": MetricName.PROMPT_TOKENS,
    "tokens_kept": MetricName.TOKENS_KEPT,
    "tokens_evicted": MetricName.TOKENS_EVICTED,
    "tokens_merged": MetricName.TOKENS_MERGED,
    "freed_blocks": MetricName.FREED_BLOCKS,
    "freed_bytes": MetricName.FREED_BYTES,
    "cached_blocks_released": MetricName.CACHED_BLOCKS_RELEASED,
    "blocks_kept_in_place": MetricName.BLOCKS_KEPT_IN_PLACE,
    "prefix_hit_tokens": MetricName.PREFIX_HIT_TOKENS,
}
RATIO = "compression_ratio"  # gauge: latest request
LAYER_BUDGET = "layer_budget"  # {layer: ratio}, gauge: latest request
SECONDS = "compaction_seconds"  # [seconds], histogram observations
# {prompt_tokens, plan_digest} of the latest request: `worker.plan_digest` fingerprints its
# kept indices, so two servers' plans of one prompt compare in `GET /v1/kv-policy`.
LAST_PLAN = "last_plan"
ENTROPY = "layer_entropy"  # {layer: [entropy]}, histogram observations

ENTROPY_BUCKETS: list[float] = [round(0.1 * i, 1) for i in range(1, 11)]
SECONDS_BUCKETS: list[float] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
]


@dataclass
class EntropyKVStats(KVConnectorStats):
    """One interval of compression numbers, `{policy: {...}}` (see module docstring).

    Counters add up when aggregated, the latest gauges win, observations concatenate.
    """

    def __post_init__(self) -> None:
        if self.data is None:
            self.data = {}

    def reset(self) -> None:
        self.data = {}

    def is_empty(self) -> bool:
        return not self.data

    def _policy(self, policy: str) -> dict[str, Any]:
        return self.data.setdefault(policy, {})

    def record_compression(
        self,
        policy: str,
        prompt_tokens: int,
        compressible_tokens: int,
        kept_per_layer: dict[int, int],
        seconds: float,
        layer_entropy: dict[int, float] | None = None,
        summaries_per_layer: dict[int, tuple[int, int]] | None = None,
        plan_digest: str = "",
    ) -> None:
        """One compressed request: `kept_per_layer` slots of the `compressible_tokens` prefix
        stay in each layer (kept tokens, then summary tokens); the tail beyond that prefix
        stays in place. `summaries_per_layer`: (summary slots, prompt tokens they stand for).
        Per request, the mean over layers: kept slots, tokens merged into summaries, and the
        rest of the prompt, evicted."""
        if not kept_per_layer:
            return
        tail = prompt_tokens - compressible_tokens
        kept = {layer: m + tail for layer, m in kept_per_layer.items()}
        summaries = summaries_per_layer or {}
        # Sums over layers in integers before one division: a difference of float means
        # (evicted = prompt - kept + slots - merged) can come out at -1e-13 when a policy
        # merges everything it drops, and a Prometheus counter refuses negative increments.
        kept_sum = sum(kept.values())
        slots_sum = sum(slots for slots, _ in summaries.values())
        merged_sum = sum(merged for _, merged in summaries.values())
        evicted_sum = len(kept) * prompt_tokens - (kept_sum - slots_sum) - merged_sum
        mean_kept = kept_sum / len(kept)
        entry = self._policy(policy)
        for key, value in (
            ("requests", 1),
            ("prompt_tokens", prompt_tokens),
            ("tokens_kept", mean_kept),
            ("tokens_evicted", max(0, evicted_sum) / len(kept)),
            ("tokens_merged", merged_sum / len(kept)),
        ):
            entry[key] = entry.get(key, 0) + value
        entry[RATIO] = mean_kept / prompt_tokens if prompt_tokens else 1.0
        entry[LAYER_BUDGET] = {
            str(layer): k / prompt_tokens if prompt_tokens else 1.0 for layer, k in kept.items()
        }
        entry[LAST_PLAN] = {"prompt_tokens": prompt_tokens, "plan_digest": plan_digest}
        entry.setdefault(SECONDS, []).append(float(seconds))
        entropies = entry.setdefault(ENTROPY, {})
        for layer, value in (layer_entropy or {}).items():
            entropies.setdefault(str(layer), []).append(float(value))

    def record_freed(self, policy: str, blocks: int, num_bytes: int,
                     cached_blocks_released: int = 0, blocks_kept_in_place: int = 0,
                     prefix_hit_tokens: int = 0) -> None:
        """What the scheduler did for one compacted request: blocks it returned to the pool
        net of the kept blocks it gave (vLLM counts cached blocks as free), their KV bytes,
        how many of the released prompt blocks stay in the prefix cache for reuse, how many
        prompt blocks it kept in place (every token kept, not copied), and how many
        prompt tokens the request had found in the prefix cache."""
        entry = self._policy(policy)
        for key, value in (("freed_blocks", blocks), ("freed_bytes", num_bytes),
                           ("cached_blocks_released", cached_blocks_released),
                           ("blocks_kept_in_place", blocks_kept_in_place),
                           ("prefix_hit_tokens", prefix_hit_tokens)):
            entry[key] = entry.get(key, 0) + value

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if other is None or other.is_empty():
            return self
        for policy, theirs in other.data.items():
            mine = self._policy(policy)
            for key, value in theirs.items():
                if key in COUNTER_KEYS:
                    mine[key] = mine.get(key, 0) + value
                elif key in (RATIO, LAYER_BUDGET, LAST_PLAN):
                    mine[key] = copy.deepcopy(value)
                elif key == SECONDS:
                    mine.setdefault(SECONDS, []).extend(value)
                elif key == ENTROPY:
                    entropies = mine.setdefault(ENTROPY, {})
                    for layer, values in value.items():
                        entropies.setdefault(layer, []).extend(values)
                else:
                    raise AssertionError(f"unknown vllm-entropy-kv stats key {key!r}")
        return self

    def reduce(self) -> dict[str, int | float]:
        """A flat summary for vLLM's periodic log line."""
        summary: dict[str, int | float] = {}
        for policy, entry in self.data.items():
            for key in COUNTER_KEYS:
                if key in entry:
                    value = entry[key]
                    summary[f"{policy}_{key}"] = round(value, 1) if isinstance(
                        value, float) else value
            if entry.get(SECONDS):
                seconds = entry[SECONDS]
                summary[f"{policy}_compaction_ms_avg"] = round(
                    1000 * sum(seconds) / len(seconds), 1)
        return summary


def build_stats(data: dict[str, Any] | None = None) -> EntropyKVStats:
    # A copy: vLLM's logging and Prometheus loggers receive the same dict, and aggregation
    # mutates the accumulator.
    return EntropyKVStats(data=copy.deepcopy(data) if data else {})


class LiveTotals:
    """Running totals in the API server since start-up, for `GET /v1/kv-policy`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_policy: dict[str, dict[str, Any]] = {}

    def add(self, data: dict[str, Any]) -> None:
        with self._lock:
            for policy, entry in data.items():
                totals = self._by_policy.setdefault(
                    policy, {key: 0 for key in COUNTER_KEYS} | {"last_request": None}
                )
                for key in COUNTER_KEYS:
                    totals[key] += entry.get(key, 0)
                if RATIO in entry:
                    totals["last_request"] = {
                        RATIO: entry[RATIO],
                        "layer_budget_ratio": dict(entry.get(LAYER_BUDGET, {})),
                        **entry.get(LAST_PLAN, {}),
                    }

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Totals by policy. Where vLLM runs several API server processes (it does for
        `--data-parallel-size` > 1, `--api-server-count`) each observes only the stats
        that reach it, so the counters come from the multiprocess files all of them write
        (what `/metrics` sums too); `last_request` stays this process's own."""
        with self._lock:
            totals = copy.deepcopy(self._by_policy)
        shared = _shared_counters()
        if shared is None:
            return totals
        return {policy: {**counters, "last_request": totals.get(policy, {}).get(
                    "last_request")}
                for policy, counters in shared.items()}

    def clear(self) -> None:
        with self._lock:
            self._by_policy.clear()


LIVE_TOTALS = LiveTotals()


def _shared_counters() -> dict[str, dict[str, float]] | None:
    """Every API server process's counters summed by policy (over engines too), from
    Prometheus' multiprocess directory; None when vLLM runs one API server (no directory)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory or not os.path.isdir(directory):
        return None
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    keys = {name: key for key, name in COUNTER_METRICS.items()}
    totals: dict[str, dict[str, float]] = {}
    for family in registry.collect():
        for sample in family.samples:
            key = keys.get(sample.name)
            if key is not None and "policy" in sample.labels:
                counters = totals.setdefault(sample.labels["policy"],
                                             dict.fromkeys(COUNTER_KEYS, 0))
                counters[key] += sample.value
    # Prometheus keeps floats; counts read as the ints the in-process totals hold.
    return {policy: {key: int(v) if float(v).is_integer() else v for key, v in c.items()}
            for policy, c in totals.items()}


class EntropyKVPromMetrics(KVConnectorPromMetrics):
    """The collectors, created by vLLM's `PrometheusStatLogger` in the API server."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        _unregister(name for name in _collector_names() if name != MetricName.INFO)
        labels = list(self._labelnames) + ["policy"]
        layer_labels = labels + ["layer"]
        self._counters = {
            key: self._counter_cls(name=COUNTER_METRICS[key].removesuffix("_total"),
                                   documentation=doc, labelnames=labels)
            for key, doc in (
                ("requests", "Requests whose prompt KV cache was compressed at the end of "
                             "prefill."),
                ("prompt_tokens", "Tokens in the KV cache of compressed requests when they "
                                  "were compressed (the prompt)."),
                ("tokens_kept", "Prompt tokens kept by compression, averaged over layers."),
                ("tokens_evicted", "Prompt tokens evicted by compression, averaged over "
                                   "layers (prompt tokens - kept - merged)."),
                ("tokens_merged", "Prompt tokens folded into summary tokens, averaged over "
                                  "layers (0 for eviction policies)."),
                ("freed_blocks", "KV cache blocks (one layer's block each) returned to "
                                 "vLLM's pool by compression."),
                ("freed_bytes", "KV cache bytes returned to vLLM's pool by compression "
                                "(freed blocks x block size x K/V bytes per token per "
                                "layer)."),
                ("cached_blocks_released", "Prompt blocks a compressed request released "
                                           "that stay in vLLM's prefix cache (free, "
                                           "evictable, reused by a later hit)."),
                ("blocks_kept_in_place", "Prompt blocks a compressed request kept whole: "
                                         "left in place (shared and cached as before), "
                                         "not copied."),
                ("prefix_hit_tokens", "Prompt tokens of compressed requests found in "
                                      "vLLM's prefix cache."),
            )
        }
        self._ratio = self._gauge_cls(
            name=MetricName.COMPRESSION_RATIO,
            documentation="KV kept / prompt KV of the last compressed request (kept tokens "
                          "averaged over layers / prompt tokens; 0.25 = 4x smaller).",
            labelnames=labels, multiprocess_mode="mostrecent",
        )
        self._layer_budget = self._gauge_cls(
            name=MetricName.LAYER_BUDGET,
            documentation="Per-layer budget of the last compressed request: tokens the "
                          "layer kept / prompt tokens.",
            labelnames=layer_labels, multiprocess_mode="mostrecent",
        )
        self._entropy = self._histogram_cls(
            name=MetricName.ENTROPY,
            documentation="Prefill attention entropy of a layer, as the policy measured it: "
                          "mean over heads and observed queries of H / log(visible keys), "
                          "in [0, 1]. Only policies that compute it (entropy) observe it.",
            labelnames=layer_labels, buckets=ENTROPY_BUCKETS,
        )
        self._seconds = self._histogram_cls(
            name=MetricName.COMPACTION_SECONDS,
            documentation="Time the worker spent compressing one request (policy plan and "
                          "KV compaction, all layers).",
            labelnames=labels, buckets=SECONDS_BUCKETS,
        )
        # Series for the configured policy exist from start-up, at 0.
        config = _config_of(vllm_config)
        if config is not None:
            ensure_info_metric(config)
            if config.enabled:
                for engine_idx in self.per_engine_labelvalues:
                    values = self._values(engine_idx, config.policy)
                    for counter in self._counters.values():
                        counter.labels(*values)
                    self._seconds.labels(*values)

    def _values(self, engine_idx: int, policy: str) -> list[str]:
        return [str(v) for v in self.per_engine_labelvalues[engine_idx]] + [policy]

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        LIVE_TOTALS.add(transfer_stats_data)
        for policy, entry in transfer_stats_data.items():
            values = self._values(engine_idx, policy)
            for key, counter in self._counters.items():
                if key in entry:
                    counter.labels(*values).inc(entry[key])
            if RATIO in entry:
                self._ratio.labels(*values).set(entry[RATIO])
            for layer, ratio in entry.get(LAYER_BUDGET, {}).items():
                self._layer_budget.labels(*values, layer).set(ratio)
            for seconds in entry.get(SECONDS, ()):
                self._seconds.labels(*values).observe(seconds)
            for layer, entropies in entry.get(ENTROPY, {}).items():
                child = self._entropy.labels(*values, layer)
                for value in entropies:
                    child.observe(value)


def _config_of(vllm_config: Any) -> KVPolicyConfig | None:
    try:
        return KVPolicyConfig.from_additional_config(
            getattr(vllm_config, "additional_config", None))
    except ValueError:
        return None


_INFO_LOCK = threading.Lock()
_info_gauge: Gauge | None = None


def ensure_info_metric(config: KVPolicyConfig) -> None:
    """`vllm_entropy_kv_info{policy,budget,...} 1` in this process' registry (idempotent;
    the API server creates it from the connector's metrics or from the endpoint plugin)."""
    global _info_gauge
    with _INFO_LOCK:
        if _info_gauge is None:
            _unregister([MetricName.INFO])
            _info_gauge = Gauge(
                MetricName.INFO,
                "Active vllm-entropy-kv settings (value always 1); join on instance to "
                "group vLLM's own series by policy.",
                labelnames=KVPolicyConfig.field_names(),
                multiprocess_mode="mostrecent",
            )
        _info_gauge.clear()
        _info_gauge.labels(**{
            name: str(value) for name, value in
            ((f, getattr(config, f)) for f in KVPolicyConfig.field_names())
        }).set(1)


def _collector_names() -> list[str]:
    return [
        getattr(MetricName, attr) for attr in vars(MetricName) if not attr.startswith("_")
    ]


def _unregister(names) -> None:
    """Drop earlier collectors of ours from the default registry (a second stat logger in
    the same process would otherwise fail with duplicated time series)."""
    wanted = {name.removesuffix("_total") for name in names}
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", None) in wanted:
            REGISTRY.unregister(collector)


__all__ = [
    "LIVE_TOTALS",
    "EntropyKVPromMetrics",
    "EntropyKVStats",
    "MetricName",
    "build_stats",
    "ensure_info_metric",
]
