"""The KV connector: vLLM's in-tree channel between the worker (which sees attention) and
the scheduler (which owns blocks). It transfers no KV; it carries compression plans.

Worker side: `handle_preemptions`, vLLM's hook before a step's inputs are prepared, plans
the requests whose prefill ended in an earlier step and that this step still schedules
(planning after the forward of the last chunk would delay the first token by the whole
compaction); `build_connector_worker_meta` ships the reports. Scheduler side:
`update_connector_output` gives each reported request fresh blocks for its kept tokens in
place of its prompt blocks, which it releases, but for the blocks that keep every token
(`engine/block_table.py`); the next `build_connector_meta` sends the kept block ids, and the
worker writes the kept tokens into the fresh ones in `handle_preemptions`. The same metadata
tells the worker which requests start a prefill (a prefix-cache hit starts one past position
0) and which requests the step runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)

from vllm_entropy_kv.config import KVPolicyConfig
from vllm_entropy_kv.engine.block_table import (
    has_blocks,
    holds,
    limit_prefix_hits,
    swap_in_kept_blocks,
)
from vllm_entropy_kv.engine.spec import LayerFullAttentionSpec
from vllm_entropy_kv.engine.worker import (
    CompressionReport,
    compressible_tokens,
    compression_worker,
    settings_of_request,
    window_start,
)
from vllm_entropy_kv.metrics import EntropyKVPromMetrics, EntropyKVStats, build_stats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

CONNECTOR_NAME = "EntropyKVConnector"


@dataclass
class EntropyKVConnectorMetadata(KVConnectorMetadata):
    """Scheduler to worker, once per step, before the step's inputs are prepared."""

    # Requests whose prefill starts in this step (new or resumed): their prompt lengths.
    started: dict[str, int] = field(default_factory=dict)
    # Per compacted request and layer, its kept blocks: those kept in place, then the fresh
    # ones its other kept tokens go to.
    kept_blocks: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    # Planned requests left uncompressed (gone, or no room for their kept blocks).
    dropped: set[str] = field(default_factory=set)
    # Every request this step runs: a finished prefill is planned only while its request
    # still holds its blocks.
    scheduled: set[str] = field(default_factory=set)


class RanksDisagreeError(RuntimeError):
    """Two tensor-parallel ranks compressed a request differently; freeing either rank's
    block ranges could hand another request blocks the other rank still reads."""


@dataclass
class CompressionReports(KVConnectorWorkerMetadata):
    """One step's reports from one worker; vLLM's executor folds every rank's together."""

    reports: dict[str, CompressionReport] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        """Every TP rank must report the same requests with the same plans (engine/parallel.py
        makes them so); otherwise the engine stops here, before the scheduler frees a block."""
        assert isinstance(other, CompressionReports)
        differ = {
            req_id for req_id in self.reports.keys() | other.reports.keys()
            if (mine := self.reports.get(req_id)) is None
            or (theirs := other.reports.get(req_id)) is None
            or (mine.kept_tokens, mine.plan_digest) != (theirs.kept_tokens, theirs.plan_digest)
        }
        if differ:
            shown = {r: [(x.plan_digest if x else "no report") for x in
                         (self.reports.get(r), other.reports.get(r))] for r in sorted(differ)}
            raise RanksDisagreeError(
                f"vllm-entropy-kv: tensor-parallel ranks compressed requests differently "
                f"(plan digests per rank: {shown}); no block of them is freed. This is a bug: "
                "please report it with the server log")
        return CompressionReports({**self.reports, **other.reports})


class EntropyKVConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.config = KVPolicyConfig.from_additional_config(vllm_config.additional_config)
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        self.group_of_layer = {
            group.kv_cache_spec.layer_idx: group_id
            for group_id, group in enumerate(groups)
            if isinstance(group.kv_cache_spec, LayerFullAttentionSpec)
        }
        self.layer_of_group = {g: layer for layer, g in self.group_of_layer.items()}
        # Metrics: KV bytes one block held (block size x K/V bytes per token); the layers'
        # specs differ only in their index.
        self.block_bytes = groups[0].kv_cache_spec.page_size_bytes if groups else 0
        self.block_size = vllm_config.cache_config.block_size
        self._scheduler_stats = EntropyKVStats()
        self._tp_size = vllm_config.parallel_config.tensor_parallel_size
        # Scheduler side: requests by id, their settings, their prefix-cache hits, and the
        # fresh blocks to announce in the next step's metadata.
        self._requests: dict[str, Request] = {}
        self._request_configs: dict[str, KVPolicyConfig] = {}
        self._prefix_hit_tokens: dict[str, int] = {}
        self._kept_blocks: dict[str, dict[int, list[int]]] = {}
        self._dropped: set[str] = set()
        if role == KVConnectorRole.WORKER:
            compression_worker().configure(
                self.config, self.block_size, len(self.group_of_layer),
                vllm_config.model_config.get_total_num_kv_heads(),
            )

    # Worker side.
    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Called first in each step, before its inputs are prepared (metadata builders
        included), on every rank: after the previous step's output went out, and before
        this step's forward writes any block the scheduler handed on."""
        assert isinstance(kv_connector_metadata, EntropyKVConnectorMetadata)
        worker = compression_worker()
        for req_id, prompt_tokens in kv_connector_metadata.started.items():
            worker.start_prefill(req_id, prompt_tokens)
        for req_id in kv_connector_metadata.dropped:
            worker.drop_plan(req_id)
        worker.compact(kv_connector_metadata.scheduled)
        for req_id, block_ids in kv_connector_metadata.kept_blocks.items():
            worker.write_kept(req_id, block_ids)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        pass

    def wait_for_save(self) -> None:
        worker = compression_worker()
        if worker.checks_blocks:
            worker.check_blocks_read()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        reports = compression_worker().take_reports()
        # With several ranks every step sends its (maybe empty) reports, so that a rank
        # that compressed what another did not is seen by `aggregate`.
        return CompressionReports(reports) if reports or self._tp_size > 1 else None

    def get_finished(
        self, finished_req_ids: set[str]
    ) -> tuple[set[str] | None, set[str] | None]:
        worker = compression_worker()
        for req_id in finished_req_ids:
            worker.finish(req_id)
        return None, None

    # Scheduler side.
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks, num_external_tokens: int):
        pass

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        limit_prefix_hits(kv_cache_manager, self._allowed_prefix_hit)

    def _request_config(self, request: Request) -> KVPolicyConfig:
        if (known := self._request_configs.get(request.request_id)) is None:
            known = self._request_configs[request.request_id] = settings_of_request(
                self.config, request.request_id, request.sampling_params)
        return known

    def _allowed_prefix_hit(self, request: Request, num_hit_tokens: int) -> int:
        """A request that will be compressed recomputes at least its observation window:
        its prefix-cache hit stops at the block holding the window's first position."""
        config = self._request_config(request)
        prompt_tokens = request.num_prompt_tokens
        if not compressible_tokens(prompt_tokens, config, self.block_size):
            return num_hit_tokens
        cap = window_start(prompt_tokens, config) // self.block_size * self.block_size
        allowed = min(num_hit_tokens, cap)
        self._prefix_hit_tokens[request.request_id] = allowed
        return allowed

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        started = [new.req_id for new in scheduler_output.scheduled_new_reqs]
        started += scheduler_output.scheduled_cached_reqs.resumed_req_ids
        meta = EntropyKVConnectorMetadata(
            started={req_id: self._requests[req_id].num_prompt_tokens for req_id in started
                     if req_id in self._requests},
            dropped=self._dropped,
            scheduled=set(scheduler_output.num_scheduled_tokens),
        )
        managers = self._managers()
        for req_id, kept in self._kept_blocks.items():
            # Preempted or finished since its blocks were swapped: they may be another's now.
            if all(holds(managers[self.group_of_layer[layer]], req_id, ids)
                   for layer, ids in kept.items()):
                meta.kept_blocks[req_id] = kept
            else:
                meta.dropped.add(req_id)
        self._kept_blocks, self._dropped = {}, set()
        return meta

    def on_new_request(self, request: Request) -> None:
        self._requests[request.request_id] = request

    def _managers(self) -> list[Any]:
        assert self._kv_cache_manager is not None
        return self._kv_cache_manager.coordinator.single_type_managers

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, CompressionReports) or self._kv_cache_manager is None:
            return
        managers = self._managers()
        pool = self._kv_cache_manager.block_pool
        for req_id, report in meta.reports.items():
            kept = {self.group_of_layer[layer]: m // self.block_size
                    for layer, m in report.kept_tokens.items()}
            in_place = {self.group_of_layer[layer]: b
                        for layer, b in report.blocks_in_place.items()}
            swap = swap_in_kept_blocks(managers, pool, req_id,
                                       report.num_tokens // self.block_size, kept, in_place)
            if swap is None:
                if has_blocks(managers[next(iter(kept))], req_id):
                    logger.warning("vllm-entropy-kv: %s: no free blocks for its %d kept "
                                   "blocks; left uncompressed", req_id, sum(kept.values()))
                self._dropped.add(req_id)
                continue
            self._kept_blocks[req_id] = {
                self.layer_of_group[g]: ids for g, ids in swap.kept_block_ids.items()}
            self._scheduler_stats.record_freed(
                report.policy, swap.freed_blocks, swap.freed_blocks * self.block_bytes,
                cached_blocks_released=swap.cached_blocks_released,
                blocks_kept_in_place=swap.blocks_kept_in_place,
                prefix_hit_tokens=self._prefix_hit_tokens.pop(req_id, 0),
            )

    # Metrics: vLLM's KV-connector stats pipeline (see vllm_entropy_kv/metrics.py).
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._role == KVConnectorRole.WORKER:
            return compression_worker().take_stats()
        if self._scheduler_stats.is_empty():
            return None
        stats, self._scheduler_stats = self._scheduler_stats, EntropyKVStats()
        return stats

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return build_stats(data)

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        return EntropyKVPromMetrics(
            vllm_config, metric_types, labelnames, per_engine_labelvalues
        )

    def request_finished(self, request: Request, block_ids: list[int]):
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(self, request: Request, block_ids):
        for state in (self._requests, self._request_configs, self._prefix_hit_tokens,
                      self._kept_blocks):
            state.pop(request.request_id, None)
        return False, None
