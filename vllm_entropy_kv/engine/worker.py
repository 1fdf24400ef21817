"""Worker-side compression: capture each layer's prefill, plan with the policy, compact.

Timeline of one request, all in the worker process:
1. The steps that compute the request's prompt, in one chunk or several (vLLM's chunked
   prefill), after any prefix-cache hit: every layer's backend `forward` hands
   `CompressionWorker.capture` the queries of the observation window (the prompt's last W
   positions) that its chunk holds. Nothing else is kept: keys and values are in the paged
   cache.
2. Step t, the forward of the prompt's last chunk, samples the first token as stock vLLM
   does: no compression work delays it.
3. At the start of the request's next step (t+1, `handle_preemptions` of the connector),
   `compact` reads each layer's prompt keys back from the paged cache (`cache_layout`;
   values too for a policy that reads them, else only the values of the kept tokens it
   will move), runs the policy over all layers and keeps each layer's kept tokens
   (and summaries) aside, but for the prompt blocks whose every token is kept: its report
   says how many blocks each layer keeps, and which prompt blocks keep every token (they
   are not copied). The prompt's blocks are not touched: other requests may share them
   through the prefix cache.
4. The scheduler hears of the report with step t+1's output, keeps the wholly kept blocks,
   gives the request fresh blocks for the other kept tokens and releases the rest of its
   prompt blocks (`engine/block_table.py`); at the start of the next step it schedules, the
   connector hands the worker the kept block ids (`write_kept`), which writes the other
   kept tokens into the fresh ones before the step's forward.
5. Later steps: the metadata builder gives the kernel a virtual block-table row of the kept
   blocks (those kept in place, then the fresh ones) followed by the tail, and a physical
   sequence length; positions and slot mapping stay logical. Attention over past tokens
   does not depend on their order (keys carry their RoPE positions). docs/ENGINE.md says why
   no step reads a block another request was given.

Only the compressible prefix (whole blocks) is planned; the partially filled last prompt
block stays in place because decode appends to it at logical slots. The observation window
is still the prompt's true last queries (`LayerObservation.query_offset`): that is where a
question after a long context sits, and it may lie entirely in the partial block.
"""

from __future__ import annotations

import hashlib
import os
import time
import weakref
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from vllm.logger import init_logger

from vllm_entropy_kv.config import KVPolicyConfig, KVPolicyConfigError
from vllm_entropy_kv.metrics import EntropyKVStats
from vllm_entropy_kv.engine.cache_layout import (
    BlockLayout,
    cache_layout,
    request_amx_permission,
    write_tokens,
)
from vllm_entropy_kv.engine.parallel import head_shard, tensor_parallel_group
from vllm_entropy_kv.policies import LayerObservation, LayerPlan
from vllm_entropy_kv.policies.stats import compressed_kv

logger = init_logger(__name__)

# Set to 1 to check, every step, that no KV block is read by two (request, layer) pairs: a
# block freed by compaction and handed on while its old owner still read it would be. Costs
# about a millisecond per step; the tests turn it on.
CHECK_BLOCKS_ENV = "VLLM_ENTROPY_KV_CHECK_BLOCKS"


class BlockOwnershipError(RuntimeError):
    """A KV block is read in one step as two different things: by two layers, at two
    logical positions, or as one request's kept block by another reader."""


@dataclass
class CaptureRequest:
    """A batch row that computes prompt positions `[chunk_start, chunk_end)` of a request
    that will be compressed (the whole prompt, or one chunk of it)."""

    req_id: str
    token_start: int  # the row's first query in the batch
    chunk_start: int
    chunk_end: int
    num_tokens: int  # compressible prefix: whole blocks only
    block_ids: torch.Tensor  # this layer's logical block row for the request
    config: KVPolicyConfig  # the server's settings with the request's own on top
    prompt_tokens: int  # the prompt's length; its last queries observe (the question)

    @property
    def is_last_chunk(self) -> bool:
        return self.chunk_end >= self.prompt_tokens

    @property
    def window(self) -> tuple[int, int]:
        """The prompt positions of the observation queries."""
        return window_start(self.prompt_tokens, self.config), self.prompt_tokens


@dataclass
class CapturedLayer:
    """One layer's observation queries, gathered chunk by chunk, and, once the last chunk
    ran, where its cache is."""

    query_chunks: list[torch.Tensor] = field(default_factory=list)  # [t, Hq, d] each
    scale: float = 1.0
    block_ids: torch.Tensor | None = None
    kv_cache: torch.Tensor | None = None
    layer: Any = None  # the vLLM attention layer: its ISA tag and KV scales drive the cache op
    kv_cache_dtype: str = "auto"

    def observation(self, num_tokens: int, prompt_tokens: int,
                    with_values: bool) -> LayerObservation:
        """Queries from the capture, keys (and values, if `with_values`) of the first
        `num_tokens` prompt positions read back from the paged cache (copies of what the
        forward wrote)."""
        layout = self._layout()
        return LayerObservation(
            queries=torch.cat(self.query_chunks).transpose(0, 1).contiguous(),
            keys=layout.gather_keys(self.kv_cache, self.block_ids, num_tokens),
            values=(layout.gather_values(self.kv_cache, self.block_ids, num_tokens)
                    if with_values else None),
            scale=self.scale, query_offset=prompt_tokens - num_tokens,
        )

    def values_at(self, positions: torch.Tensor) -> torch.Tensor:
        """`[Hkv, len(positions), d]` values of prompt positions, read back from the cache."""
        return self._layout().values_at(self.kv_cache, self.block_ids, positions)

    def _layout(self) -> BlockLayout:
        assert self.kv_cache is not None and self.block_ids is not None
        layout = cache_layout(self.layer.isa, self.kv_cache, self.kv_cache_dtype)
        assert layout is not None, "refused at start-up (engine/setup.py)"
        return layout


@dataclass
class PendingCompression:
    num_tokens: int
    prompt_tokens: int
    config: KVPolicyConfig
    layers: dict[int, CapturedLayer] = field(default_factory=dict)
    complete: bool = False  # the prompt's last chunk has run

    def incomplete_layers(self, num_layers: int) -> list[int]:
        """Layers without their whole observation window or their cache (a request whose
        chunks some layer did not see; never expected)."""
        window = min(self.config.window, self.prompt_tokens)
        return [
            i for i in range(num_layers)
            if (captured := self.layers.get(i)) is None or captured.kv_cache is None
            or sum(chunk.shape[0] for chunk in captured.query_chunks) != window
        ]


@dataclass
class KeptLayer:
    """One layer's kept tokens and summaries, planned at step t and written at step t+2 into
    the blocks the scheduler gives (`CompressionWorker.write_kept`)."""

    keys: torch.Tensor  # [Hkv, m, d], the kept tokens outside the blocks kept in place
    values: torch.Tensor
    captured: CapturedLayer  # where the layer's cache is, and its cache op's settings
    num_blocks: int  # the compressed prompt's blocks, which the kept blocks replace
    in_place: torch.Tensor  # logical indices of the prompt blocks kept whole, which stay


@dataclass
class CompactedLayer:
    """A layer of a compacted request: its kept blocks replace the first `num_blocks`
    logical blocks (the compressed prompt) in every kernel view of its row; the first of
    them are the row's own prompt blocks at logical indices `in_place` (unchanged, maybe
    shared through the prefix cache), the others fresh."""

    kept_block_ids: torch.Tensor  # int32
    num_blocks: int
    in_place: torch.Tensor  # int64

    def logical_positions(self, used: int) -> torch.Tensor:
        """The logical block position of each of the first `used` blocks of the kernel's
        view: a block kept in place at its own, a fresh kept block -1 (its request's alone),
        the tail's after the compressed prompt."""
        kept = self.kept_block_ids.numel()
        fresh = torch.full((kept - self.in_place.numel(),), -1, dtype=torch.int64)
        tail = torch.arange(self.num_blocks, self.num_blocks + max(0, used - kept))
        return torch.cat([self.in_place, fresh, tail])[:used]


@dataclass
class CompressionReport:
    """What the worker planned for one request: how many tokens (whole blocks) each layer
    keeps of the `num_tokens` compressed prompt tokens, and which of its prompt blocks keep
    every token (logical indices; they are not copied)."""

    policy: str
    num_tokens: int
    kept_tokens: dict[int, int]
    blocks_in_place: dict[int, list[int]]
    seconds: float
    # Stats only (metrics): tokens in the cache when compressed (the prompt; the tail beyond
    # `num_tokens` stays in place), and each layer's entropy if the policy computed it.
    prompt_tokens: int = 0
    layer_entropy: dict[int, float] = field(default_factory=dict)
    summaries: dict[int, tuple[int, int]] = field(default_factory=dict)  # (slots, merged)
    plan_digest: str = ""


class CompressionWorker:
    """Per-worker-process state shared by the backend, the metadata builder and the
    connector (they are created separately by vLLM, so they meet here)."""

    def __init__(self) -> None:
        self.config: KVPolicyConfig | None = None  # the server's defaults
        self.block_size = 0
        self.num_layers = 0
        self.total_kv_heads = 0
        self._runner: weakref.ref[Any] | None = None
        # Planned at the end of prefill, waiting for the scheduler's fresh blocks.
        self.kept: dict[str, dict[int, KeptLayer]] = {}
        self.compacted: dict[str, dict[int, CompactedLayer]] = {}
        self.log_bias: dict[str, dict[int, torch.Tensor]] = {}
        self.pending: dict[str, PendingCompression] = {}
        # The prompt length of each request whose prompt is being computed (set when the
        # scheduler starts or resumes it, dropped once planned).
        self.prefill_tokens: dict[str, int] = {}
        self.request_configs: dict[str, KVPolicyConfig] = {}
        self.reports: dict[str, CompressionReport] = {}
        self.stats = EntropyKVStats()
        self.checks_blocks = os.environ.get(CHECK_BLOCKS_ENV) == "1"
        self._blocks_read: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []

    def configure(self, config: KVPolicyConfig, block_size: int, num_layers: int,
                  total_kv_heads: int = 0) -> None:
        self.config = config
        self.block_size = block_size
        self.num_layers = num_layers
        self.total_kv_heads = total_kv_heads  # the model's, over all TP ranks
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
        assert self.config is not None
        # Every layer's metadata builder asks; a request's settings never change.
        if (known := self.request_configs.get(req_id)) is None:
            params = getattr(self._request_state(req_id), "sampling_params", None)
            known = self.request_configs[req_id] = settings_of_request(self.config, req_id,
                                                                      params)
        return known

    def compressible_tokens(self, prompt_tokens: int, config: KVPolicyConfig) -> int:
        return compressible_tokens(prompt_tokens, config, self.block_size)

    def forget(self, req_id: str) -> None:
        """Drop a request's compaction state (it is recomputed after preemption)."""
        self.kept.pop(req_id, None)
        self.compacted.pop(req_id, None)
        self.log_bias.pop(req_id, None)
        self.pending.pop(req_id, None)
        self.prefill_tokens.pop(req_id, None)

    def finish(self, req_id: str) -> None:
        """Drop all state of a finished request."""
        self.forget(req_id)
        self.request_configs.pop(req_id, None)

    def start_prefill(self, req_id: str, prompt_tokens: int) -> None:
        """A request the scheduler starts (new, or resumed after preemption; after a
        prefix-cache hit its first chunk starts past position 0): any earlier compaction of
        it is void. Compression covers the prompt, observed by its last queries, also when a
        recompute after preemption computes the outputs so far too: the request is
        compressed as it was the first time, its outputs stay whole."""
        self.forget(req_id)
        self.prefill_tokens[req_id] = prompt_tokens

    def capture_request(
        self, req_id: str, token_start: int, chunk_start: int, chunk_end: int,
        block_ids: torch.Tensor,
    ) -> CaptureRequest | None:
        """What a metadata builder's batch row asks of `capture`, or None when the row holds
        no prompt position that compression needs."""
        prompt_tokens = self.prefill_tokens.get(req_id, 0)
        if chunk_start >= prompt_tokens:
            return None  # decoding, or recomputing outputs after preemption
        config = self.request_config(req_id)
        num_tokens = self.compressible_tokens(prompt_tokens, config)
        if not num_tokens:
            return None
        request = CaptureRequest(req_id, token_start, chunk_start, chunk_end, num_tokens,
                                 block_ids, config, prompt_tokens)
        if chunk_end <= request.window[0] and not request.is_last_chunk:
            return None  # an earlier chunk: none of its queries observe
        return request

    def capture(
        self,
        request: CaptureRequest,
        layer_idx: int,
        layer: Any,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        scale: float,
        kv_cache_dtype: str,
    ) -> None:
        """Keep the observation queries `layer_idx` computed in this chunk (copies: vLLM
        reuses its buffers), and, at the last chunk, where the layer's cache is."""
        pending = self.pending.setdefault(request.req_id, PendingCompression(
            request.num_tokens, request.prompt_tokens, request.config))
        captured = pending.layers.setdefault(layer_idx, CapturedLayer(scale=scale))
        first, last = request.window
        first, last = max(first, request.chunk_start), min(last, request.chunk_end)
        if first < last:
            offset = request.token_start - request.chunk_start
            captured.query_chunks.append(query[offset + first : offset + last].clone())
        if request.is_last_chunk:
            captured.block_ids = request.block_ids.clone()
            captured.kv_cache, captured.layer = kv_cache, layer
            captured.kv_cache_dtype = kv_cache_dtype
            pending.complete = True

    def note_blocks_read(self, req_id: str, layer_idx: int, blocks: torch.Tensor,
                         positions: torch.Tensor) -> None:
        """The physical blocks one request's row of one layer reads in this step, and their
        logical block positions (-1: a kept block of a compacted request)."""
        self._blocks_read.append((req_id, layer_idx, blocks, positions))

    def check_blocks_read(self) -> None:
        """At the end of a step: requests share a block only as the prefix cache shares it,
        in one layer at one logical position (hashes chain from the prompt's start), and a
        compacted request's kept blocks are read by it alone. A block freed by compaction
        and handed on while its old owner still read it breaks this."""
        noted, self._blocks_read = self._blocks_read, []
        if not noted:
            return
        reads = torch.cat([
            torch.stack([blocks.to(torch.int64), torch.full_like(positions, layer_idx),
                         positions.to(torch.int64)], dim=1)
            for _, layer_idx, blocks, positions in noted
        ])
        distinct = torch.unique(reads, dim=0)
        ids, counts = torch.unique(distinct[:, 0], return_counts=True)
        bad = set(ids[counts > 1].tolist())
        read_ids, read_counts = torch.unique(reads[:, 0], return_counts=True)
        private = set(reads[reads[:, 2] < 0, 0].tolist())
        bad |= private & set(read_ids[read_counts > 1].tolist())
        if bad:
            readers = [(req, layer) for req, layer, b, _ in noted if bad & set(b.tolist())]
            raise BlockOwnershipError(
                f"vllm-entropy-kv: KV blocks {sorted(bad)[:8]} are read as different things "
                f"(layers, logical positions or a request's kept blocks) in one step: "
                f"{readers[:8]}")

    def compact(self, scheduled: Collection[str]) -> None:
        """Plan every request whose prompt's last chunk ran in an earlier step and that
        `scheduled` (this step's requests) still holds: its blocks are its own until this
        step's output is processed. A request that finished or was preempted meanwhile is
        left pending until `finish` or `start_prefill` drops it."""
        complete = [req_id for req_id, p in self.pending.items()
                    if p.complete and req_id in scheduled]
        group = tensor_parallel_group() if complete else None
        for req_id in complete:
            request = self.pending.pop(req_id)
            self.prefill_tokens.pop(req_id, None)
            if missing := request.incomplete_layers(self.num_layers):
                logger.warning("vllm-entropy-kv: %s: layers %s were not captured whole; not "
                               "compressed", req_id, missing)
                continue
            started = time.perf_counter()
            report, self.kept[req_id] = self._plan_request(req_id, request, group)
            report.seconds = time.perf_counter() - started
            self.reports[req_id] = report
            if group is None or group.rank_in_group == 0:
                self._record_stats(report)  # once per request, not once per TP rank

    def _plan_request(
        self, req_id: str, request: PendingCompression, group: Any | None
    ) -> tuple[CompressionReport, dict[int, KeptLayer]]:
        """Plan one request (with its TP group's ranks, if `group`); returns its report and
        each layer's kept tokens, to write once the scheduler gives their blocks."""
        config = request.config
        # Built from all of the request's settings (window, reach, ...), cached per value.
        policy = config.make_policy()
        block, n = self.block_size, request.num_tokens
        layer_ids = sorted(request.layers)
        captured = [request.layers[i] for i in layer_ids]
        observations = [c.observation(n, request.prompt_tokens, policy.reads_values)
                        for c in captured]
        if group is not None:
            shard = head_shard(group, observations[0].keys.shape[0], self.total_kv_heads)
            observations = [replace(o, shard=shard) for o in observations]
        plans = policy.plan(observations, config.budget_for(block))
        kept: dict[int, int] = {}
        in_place: dict[int, list[int]] = {}
        kept_layers: dict[int, KeptLayer] = {}
        log_bias: dict[int, torch.Tensor] = {}
        for layer_idx, cap, observation, plan in zip(layer_ids, captured, observations, plans):
            m = plan.num_physical
            kept[layer_idx] = m
            if m % block or m > n:
                raise ValueError(f"layer {layer_idx}: plan keeps {m} tokens, not a whole "
                                 f"number of {block}-token blocks within {n}")
            # The layer's new first m slots: the blocks that keep every token, already in
            # place, then the other kept tokens in prompt order and the summaries, which
            # alone are gathered (the bias of the tokens in place is 0).
            whole = blocks_in_place(plan, block, n // block)
            in_place[layer_idx] = whole.tolist()
            moved = replace(plan, keep=plan.keep[~torch.isin(plan.keep // block, whole)])
            keys, values, bias = compressed_kv(
                observation, moved,
                None if observation.values is not None else cap.values_at(moved.keep))
            kept_layers[layer_idx] = KeptLayer(keys, values, cap, n // block, whole)
            if config.merge_bias and bool(bias.any()):
                log_bias[layer_idx] = torch.cat([bias.new_zeros(whole.numel() * block), bias])
        if log_bias:
            self.log_bias[req_id] = log_bias
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
        report = CompressionReport(config.policy, n, kept, in_place, seconds=0.0,
                                   prompt_tokens=request.prompt_tokens,
                                   layer_entropy=entropies, summaries=summaries,
                                   plan_digest=plan_digest(plans))
        return report, kept_layers

    def write_kept(self, req_id: str, block_ids: dict[int, list[int]]) -> None:
        """Write each layer's planned tokens into the fresh blocks the scheduler gave the
        request in place of its prompt blocks (start of step t+2: every step that read those
        blocks for any request has finished, and this step's forward has not begun); the
        blocks kept in place already hold theirs."""
        kept = self.kept.pop(req_id)
        block = self.block_size
        compacted: dict[int, CompactedLayer] = {}
        for layer_idx, ids in block_ids.items():
            layer = kept[layer_idx]
            cap = layer.captured
            ids_tensor = torch.tensor(ids, dtype=torch.int64)
            if layer.keys.shape[1]:
                positions = torch.arange(layer.keys.shape[1])
                fresh = ids_tensor[layer.in_place.numel():]
                slots = fresh[positions // block] * block + positions % block
                write_tokens(
                    cap.kv_cache, layer.keys.transpose(0, 1), layer.values.transpose(0, 1),
                    slots, cap.layer.isa, k_scale=cap.layer._k_scale_float,
                    v_scale=cap.layer._v_scale_float, kv_cache_dtype=cap.kv_cache_dtype,
                )
            compacted[layer_idx] = CompactedLayer(ids_tensor.to(torch.int32), layer.num_blocks,
                                                  layer.in_place)
        self.compacted[req_id] = compacted

    def drop_plan(self, req_id: str) -> None:
        """The scheduler did not compact the request (gone, or no room for its blocks): it
        goes on uncompressed."""
        self.kept.pop(req_id, None)
        self.log_bias.pop(req_id, None)

    def _request_state(self, req_id: str) -> Any:
        """The runner's `CachedRequestState` of a request, or None."""
        runner = self._runner() if self._runner is not None else None
        return getattr(runner, "requests", {}).get(req_id) if runner is not None else None

    def _record_stats(self, report: CompressionReport) -> None:
        """Metrics only: what this compression did, for the connector's stats."""
        self.stats.record_compression(
            report.policy, report.prompt_tokens, report.num_tokens, report.kept_tokens,
            report.seconds, report.layer_entropy, report.summaries, report.plan_digest,
        )

    def take_stats(self) -> EntropyKVStats | None:
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, EntropyKVStats()
        return stats

    def take_reports(self) -> dict[str, CompressionReport]:
        reports, self.reports = self.reports, {}
        return reports


def settings_of_request(server: KVPolicyConfig, req_id: str,
                        sampling_params: Any) -> KVPolicyConfig:
    """The server's settings with the request's `kv_*` extra args on top. The API server
    answers invalid ones with HTTP 400; a request that reaches the engine some other way with
    invalid settings gets the server's, with a warning, rather than failing the batch."""
    try:
        return server.for_request(getattr(sampling_params, "extra_args", None))
    except KVPolicyConfigError as e:
        logger.warning("vllm-entropy-kv: %s: %s; using the server's settings", req_id, e)
        return server


def compressible_tokens(prompt_tokens: int, config: KVPolicyConfig, block_size: int) -> int:
    """Whole blocks of the prompt; 0 if the request should not be compressed (a prompt too
    short to free anything, or the policy `none`)."""
    if not config.enabled:
        return 0
    floor = config.sink_tokens + config.recent_tokens
    num_tokens = prompt_tokens // block_size * block_size
    return num_tokens if num_tokens >= max(2 * block_size, floor + block_size) else 0


def window_start(prompt_tokens: int, config: KVPolicyConfig) -> int:
    """The first prompt position whose query observes (the window is the prompt's last
    `config.window` positions)."""
    return max(0, prompt_tokens - config.window)


def blocks_in_place(plan: LayerPlan, block_size: int, num_blocks: int) -> torch.Tensor:
    """The logical indices, in order, of the compressed prompt's blocks (the first
    `num_blocks`) whose every token the plan keeps: compaction would only copy them."""
    counts = torch.bincount(plan.keep // block_size, minlength=num_blocks)[:num_blocks]
    return (counts == block_size).nonzero().flatten()


def plan_digest(plans: list[LayerPlan]) -> str:
    """A short fingerprint of every layer's kept indices, to compare plans made by two
    servers (chunked and whole-prompt prefill) without shipping the indices."""
    digest = hashlib.sha256()
    for plan in plans:
        digest.update(plan.keep.to(torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def _merged_tokens(plan: LayerPlan) -> int:
    """Prompt tokens a plan's summaries stand for (one each when it gives no counts)."""
    if plan.summary_counts is None:
        return plan.num_summaries
    return int(plan.summary_counts.sum())


_WORKER = CompressionWorker()


def compression_worker() -> CompressionWorker:
    return _WORKER
