"""The CPU attention backend, extended to observe prefill and to read compacted caches.

Registered in place of `CPU_ATTN` through vLLM's override table (never a new enum member:
the engine core unpickles the config before plugins load). With the policy `none`, or for a
group that is not layer-tagged, every method defers to the stock backend unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_entropy_kv.engine.cache_layout import cache_layout
from vllm_entropy_kv.engine.summaries import biased_decode_attention
from vllm_entropy_kv.engine.worker import CaptureRequest, CompactedLayer, compression_worker


@dataclass(frozen=True)
class BiasedRow:
    """A request's row in a layer with summary tokens: their log(count) bias (its first
    slots), its physical block row and how many tokens that row holds."""

    log_bias: torch.Tensor
    block_row: torch.Tensor
    num_tokens: int


@dataclass
class EntropyKVAttentionMetadata(CPUAttentionMetadata):
    layer_idx: int = -1
    captures: list[CaptureRequest] = field(default_factory=list)
    # Batch rows whose layer holds summary tokens, computed by the backend, not the kernel.
    biased_rows: dict[int, BiasedRow] = field(default_factory=dict)


class EntropyKVMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.layer_idx: int | None = getattr(kv_cache_spec, "layer_idx", None)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> CPUAttentionMetadata:
        worker = compression_worker()
        if self.layer_idx is None or not worker.enabled:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        cam = common_attn_metadata
        num_reqs = cam.num_reqs
        req_ids = worker.batch_req_ids(num_reqs)
        query_start = cam.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = cam.seq_lens[:num_reqs].tolist()
        captures: list[CaptureRequest] = []
        compacted_rows: dict[int, CompactedLayer] = {}
        biases: dict[int, torch.Tensor] = {}
        for row, req_id in enumerate(req_ids):
            chunk_start = seq_lens[row] - (query_start[row + 1] - query_start[row])
            request = worker.capture_request(req_id, query_start[row], chunk_start,
                                             seq_lens[row], cam.block_table_tensor[row])
            if request is not None:
                captures.append(request)
            elif (compacted := worker.compacted.get(req_id, {}).get(self.layer_idx)) is not None:
                compacted_rows[row] = compacted
                if (bias := worker.log_bias.get(req_id, {}).get(self.layer_idx)) is not None:
                    biases[row] = bias
        biased_rows: dict[int, BiasedRow] = {}
        if compacted_rows:
            cam, biased_rows = self._physical_view_with_biased_rows(
                cam, compacted_rows, biases, query_start)
        if worker.checks_blocks:
            self._note_blocks_read(worker, req_ids, cam, biased_rows, compacted_rows)
        metadata = super().build(common_prefix_len, cam, fast_build)
        return EntropyKVAttentionMetadata(
            **{f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)},
            layer_idx=self.layer_idx,
            captures=captures,
            biased_rows=biased_rows,
        )

    def _note_blocks_read(self, worker, req_ids: list[str], view: CommonAttentionMetadata,
                          biased_rows: dict[int, BiasedRow],
                          compacted_rows: dict[int, CompactedLayer]) -> None:
        """Hand the worker's ownership check the physical blocks each row reads (the
        kernel's view; a biased row's own) and their logical block positions, -1 for fresh
        kept blocks, which belong to their request alone (blocks kept in place keep their
        own: other requests may share them through the prefix cache)."""
        for row, req_id in enumerate(req_ids):
            if (biased := biased_rows.get(row)) is not None:
                block_row, num_tokens = biased.block_row, biased.num_tokens
            else:
                block_row, num_tokens = view.block_table_tensor[row], int(view.seq_lens[row])
            used = -(-num_tokens // self.block_size)
            compacted = compacted_rows.get(row)
            positions = (torch.arange(used) if compacted is None
                         else compacted.logical_positions(used))
            worker.note_blocks_read(req_id, self.layer_idx, block_row[:used].clone(), positions)

    def _physical_view_with_biased_rows(
        self,
        cam: CommonAttentionMetadata,
        rows: dict[int, CompactedLayer],
        biases: dict[int, torch.Tensor],
        query_start: list[int],
    ) -> tuple[CommonAttentionMetadata, dict[int, BiasedRow]]:
        """Physical view for the kernel: in each listed row the kept blocks (those kept in
        place, then the fresh ones) replace the compressed prompt's blocks, the tail follows
        them, and the sequence length shrinks by the tokens dropped. Rows with a bias are
        computed by the backend from that view, so the kernel sees only their queries (a
        throwaway result, not a second pass over the cache). The runner's own tensors are not
        modified."""
        block_table = cam.block_table_tensor.clone()
        seq_lens = cam.seq_lens.clone()
        biased_rows: dict[int, BiasedRow] = {}
        for row, compacted in rows.items():
            kept = compacted.kept_block_ids.numel()
            tail = block_table[row, compacted.num_blocks :].clone()
            block_table[row, :kept] = compacted.kept_block_ids
            block_table[row, kept : kept + tail.numel()] = tail
            block_table[row, kept + tail.numel() :] = 0
            seq_lens[row] -= (compacted.num_blocks - kept) * self.block_size
            if (bias := biases.get(row)) is not None:
                biased_rows[row] = BiasedRow(bias, block_table[row].clone(), int(seq_lens[row]))
                seq_lens[row] = query_start[row + 1] - query_start[row]
        view = dataclasses.replace(
            cam,
            block_table_tensor=block_table,
            seq_lens=seq_lens,
            max_seq_len=int(seq_lens[: cam.num_reqs].max()),
        )
        return view, biased_rows


class EntropyKVAttentionImpl(CPUAttentionBackendImpl):
    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(attn_metadata, EntropyKVAttentionMetadata) and attn_metadata.captures:
            worker = compression_worker()
            for request in attn_metadata.captures:
                worker.capture(request, attn_metadata.layer_idx, layer, query, kv_cache,
                               self.scale, self.kv_cache_dtype)
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                 output_scale, output_block_scale)
        if isinstance(attn_metadata, EntropyKVAttentionMetadata) and attn_metadata.biased_rows:
            self._biased_rows(layer, query, kv_cache, attn_metadata, output)
        return output

    def _biased_rows(
        self,
        layer,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: EntropyKVAttentionMetadata,
        output: torch.Tensor,
    ) -> None:
        """The rows of requests with summary tokens, with their log(count) bias (the
        kernel has no per-token bias)."""
        # Every unquantised layout reads back; a quantised cache is refused at start-up.
        layout = cache_layout(layer.isa, kv_cache, self.kv_cache_dtype)
        assert layout is not None
        starts = metadata.query_start_loc.tolist()
        rows_out = output.view(output.shape[0], query.shape[1], query.shape[2])
        for row, biased in metadata.biased_rows.items():
            first, last = starts[row], starts[row + 1]
            rows_out[first:last] = biased_decode_attention(
                query[first:last], kv_cache, layout, biased.block_row, biased.num_tokens,
                biased.log_bias, self.scale,
            ).to(output.dtype)


class EntropyKVAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # the member it overrides; the config must unpickle everywhere

    @staticmethod
    def get_impl_cls() -> type[EntropyKVAttentionImpl]:
        return EntropyKVAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[EntropyKVMetadataBuilder]:
        return EntropyKVMetadataBuilder


def register_backend_override() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(
        AttentionBackendEnum.CPU_ATTN,
        f"{EntropyKVAttentionBackend.__module__}.{EntropyKVAttentionBackend.__qualname__}",
    )
