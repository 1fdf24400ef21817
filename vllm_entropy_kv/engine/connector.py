"""The KV connector: vLLM's in-tree channel from the worker (which sees attention) to the
scheduler (which owns blocks). It transfers nothing; it carries compression reports.

Worker side: `wait_for_save` (end of each forward) compacts the requests captured in that
forward; `build_connector_worker_meta` ships the reports. Scheduler side:
`update_connector_output` frees each layer's reported block range through its manager.
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
from vllm_entropy_kv.engine.spec import LayerFullAttentionSpec
from vllm_entropy_kv.engine.worker import CompressionReport, compression_worker
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


class EntropyKVConnectorMetadata(KVConnectorMetadata):
    """Scheduler to worker: nothing to say; the worker decides from its own batch."""


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
            or (mine.freed_ranges, mine.plan_digest) != (theirs.freed_ranges, theirs.plan_digest)
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
        # Metrics: KV bytes one freed block of a layer held (block size x K/V bytes per token).
        self.block_bytes_of_layer = {
            group.kv_cache_spec.layer_idx: group.kv_cache_spec.page_size_bytes
            for group in groups
            if isinstance(group.kv_cache_spec, LayerFullAttentionSpec)
        }
        self._scheduler_stats = EntropyKVStats()
        self._tp_size = vllm_config.parallel_config.tensor_parallel_size
        if role == KVConnectorRole.WORKER:
            compression_worker().configure(
                self.config, vllm_config.cache_config.block_size, len(self.group_of_layer),
                vllm_config.model_config.get_total_num_kv_heads(),
            )

    # Worker side.
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
        worker.compact()

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

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return EntropyKVConnectorMetadata()

    def on_new_request(self, request: Request) -> None:
        pass

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, CompressionReports) or self._kv_cache_manager is None:
            return
        managers = self._kv_cache_manager.coordinator.single_type_managers
        pool = self._kv_cache_manager.block_pool
        for req_id, report in meta.reports.items():
            for layer_idx, (first, last) in report.freed_ranges.items():
                if first >= last:
                    continue  # a keep-all plan: compacted in place, nothing to free
                manager = managers[self.group_of_layer[layer_idx]]
                free_before = pool.get_num_free_blocks()
                # Nulls the entries and returns the blocks to the shared pool; the list
                # keeps its logical length, so decode appends at logical positions.
                manager._remove_blocks_in_range(req_id, first, last)
                freed = pool.get_num_free_blocks() - free_before
                self._scheduler_stats.record_freed(
                    report.policy, freed, freed * self.block_bytes_of_layer[layer_idx]
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
        return False, None

    def request_finished_all_groups(self, request: Request, block_ids):
        return False, None
