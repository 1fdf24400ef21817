"""The worker's compaction through vLLM's real CPU cache op and attention kernel, no server:
after compaction, the kernel reading the virtual block row must compute exactly the attention
over the kept tokens plus the tail (the data path the engine relies on), in every KV cache
layout vLLM's CPU attention can choose on x86."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm import _custom_ops as ops  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, _get_attn_isa  # noqa: E402

from vllm_entropy_kv.config import KVPolicyConfig  # noqa: E402
from vllm_entropy_kv.engine.cache_layout import (  # noqa: E402
    block_layout,
    cache_layout,
    request_amx_permission,
    write_tokens,
)
from vllm_entropy_kv.engine.summaries import biased_decode_attention  # noqa: E402
from vllm_entropy_kv.engine.worker import (  # noqa: E402
    CaptureRequest,
    CompressionWorker,
    blocks_in_place,
)
from vllm_entropy_kv.policies import Budget, LayerObservation  # noqa: E402
from vllm_entropy_kv.policies.stats import attention_output, compressed_kv  # noqa: E402

HQ, HKV = 9, 3
request_amx_permission()  # this process runs the AMX kernel where the CPU has it


@dataclass(frozen=True)
class Layout:
    """A cache layout vLLM 0.32's `_get_attn_isa` picks on x86, with a shape that selects it."""

    isa: str
    dtype: torch.dtype
    block: int
    head_size: int

    @property
    def scale(self) -> float:
        return self.head_size**-0.5

    def cache(self, num_blocks: int) -> torch.Tensor:
        return torch.zeros(num_blocks, HKV, self.block, 2 * self.head_size, dtype=self.dtype)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, self.head_size, dtype=self.dtype)


LAYOUTS = [
    Layout("vec", torch.float32, 32, 64),
    Layout("vec", torch.bfloat16, 32, 64),  # bf16 on a CPU without AMX
    Layout("vec16", torch.float32, 32, 80),  # head sizes of 16 mod 32
    Layout("vec16", torch.bfloat16, 32, 80),
    Layout("amx", torch.bfloat16, 32, 64),
]
LAYOUT_IDS = [f"{c.isa}-{str(c.dtype).removeprefix('torch.')}-d{c.head_size}" for c in LAYOUTS]


def runnable(layout: Layout) -> Layout:
    """The layout, or a skip where this CPU cannot execute its attention kernel."""
    if layout.isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("the 'amx' kernel needs AMX tiles, which this CPU lacks (its cache layout "
                    "is still read back in test_cache_reads_back_what_the_cache_op_wrote)")
    return layout


def test_the_layouts_cover_what_vllm_picks_on_this_cpu() -> None:
    """Every layout the pinned vLLM chooses here, for the dtypes and head sizes it serves, is
    one the tests below cover; a new one would fail here first."""
    covered = {(c.isa, c.dtype, c.head_size % 32 == 0) for c in LAYOUTS}
    for dtype in (torch.float32, torch.bfloat16):
        for head_size in CPUAttentionBackend.get_supported_head_sizes():
            for block in (32, 64, 128):
                isa = _get_attn_isa(dtype, block, head_size)
                assert (isa, dtype, head_size % 32 == 0) in covered, (dtype, head_size, block)


def write(kv_cache, layout, keys, values, block_row, first_position):
    """Store tokens at their logical positions of `block_row`, as vLLM's prefill does."""
    positions = torch.arange(first_position, first_position + keys.shape[0])
    slots = block_row[positions // layout.block].to(torch.int64) * layout.block \
        + positions % layout.block
    write_tokens(kv_cache, keys, values, slots, layout.isa)


def kernel_attention(kv_cache, layout, query, block_row, seq_len):
    """One decode query through vLLM's CPU attention kernel."""
    key_cache, value_cache = kv_cache.view(
        kv_cache.shape[0], HKV, layout.block * 2, layout.head_size
    ).chunk(2, dim=2)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32)
    query_start = torch.tensor([0, 1], dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=HQ, num_kv_heads=HKV, head_dim=layout.head_size,
        seq_lens=seq_lens, dtype=layout.dtype, query_start_loc=query_start, causal=True,
        sliding_window_size=-1, isa=layout.isa, enable_kv_split=False,
    )
    output = torch.empty(1, HQ, layout.head_size, dtype=layout.dtype)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output,
        query_start_loc=query_start, seq_lens=seq_lens, scale=layout.scale, causal=True,
        alibi_slopes=None, sliding_window=-1, block_table=block_row[None].to(torch.int32),
        softcap=0, scheduler_metadata=metadata, s_aux=None,
    )
    return output.float()


def reference_attention(layout, query, keys, values, log_bias=None):
    """[1, HQ, D] query over [HKV, t, D] keys/values (`attention_output`, GQA-aware)."""
    out, _ = attention_output(query.transpose(0, 1), keys, values, layout.scale, log_bias)
    return out.transpose(0, 1)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("policy", ["streaming", "snapkv", "entropy", "entropy-merge", "src"])
def test_compacted_cache_reads_as_kept_tokens_plus_tail(policy: str, layout: Layout) -> None:
    layout = runnable(layout)
    block = layout.block
    torch.manual_seed(0)
    prompt, tail = 8 * block, 10  # 8 whole blocks, then a partial block decode appends to
    n = prompt + tail
    keys, values, queries = layout.randn(n, HKV), layout.randn(n, HKV), layout.randn(n, HQ)
    block_row = torch.tensor([11, 3, 7, 0, 9, 14, 2, 5, 12], dtype=torch.int32)
    kv_cache = layout.cache(16)
    write(kv_cache, layout, keys, values, block_row, 0)

    worker = CompressionWorker()
    config = KVPolicyConfig(policy=policy, budget=0.25)
    worker.configure(config, block, num_layers=1)
    # The attention layer's fields the worker reads (a real one needs a whole VllmConfig).
    layer = SimpleNamespace(isa=layout.isa, _k_scale_float=1.0, _v_scale_float=1.0)
    request = CaptureRequest("req-0", 0, 0, n, worker.compressible_tokens(n, config), block_row,
                             config, prompt_tokens=n)
    worker.capture(request, 0, layer, queries, kv_cache, layout.scale, "auto")
    worker.compact({"req-0"})
    report = worker.take_reports()["req-0"]
    kept = report.kept_tokens[0]
    assert kept % block == 0 and kept < prompt and report.num_tokens == prompt
    # The scheduler's part (engine/block_table.py): the prompt blocks whose every token is
    # kept stay, fresh blocks for the other kept tokens follow them.
    in_place = report.blocks_in_place[0]
    kept_ids = block_row[in_place].tolist() + [1, 4, 6, 8][: kept // block - len(in_place)]
    assert in_place  # every policy here keeps the recent tokens, which fill the last block
    worker.write_kept("req-0", {0: kept_ids})
    # The prompt's own blocks still hold what their prefix-cache hashes name.
    cache_view = cache_layout(layout.isa, kv_cache, "auto")
    prompt_keys = cache_view.gather(kv_cache, block_row, n)[0]
    assert torch.equal(prompt_keys, keys.transpose(0, 1).float())

    # What the policy kept, recomputed: the same plan from the same observation.
    observation = LayerObservation(
        queries=queries[n - 32 : n].transpose(0, 1),
        keys=keys[:prompt].transpose(0, 1), values=values[:prompt].transpose(0, 1),
        scale=layout.scale, query_offset=tail,
    )
    plan = config.make_policy().plan([observation], Budget(0.25, block_size=block))[0]
    assert plan.num_physical == kept
    assert in_place == blocks_in_place(plan, block, prompt // block).tolist()
    # The kept tokens in the order of their slots: those in place, then the others.
    whole = torch.isin(plan.keep // block, torch.tensor(in_place, dtype=torch.int64))
    slot_order = torch.cat([plan.keep[whole], plan.keep[~whole]])
    slot_keys, slot_values, slot_bias = compressed_kv(observation,
                                                     dataclasses.replace(plan, keep=slot_order))
    visible_keys = torch.cat([slot_keys, keys[prompt:].transpose(0, 1)], dim=1)
    visible_values = torch.cat([slot_values, values[prompt:].transpose(0, 1)], dim=1)

    virtual_row = torch.cat([torch.tensor(kept_ids, dtype=torch.int32),
                             block_row[prompt // block:]])
    query = layout.randn(1, HQ)
    # The stock kernel reads the kept tokens, the summaries (unbiased) and the tail.
    got = kernel_attention(kv_cache, layout, query, virtual_row, kept + tail)
    want = reference_attention(layout, query, visible_keys, visible_values)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    if plan.num_summaries == 0:
        assert "req-0" not in worker.log_bias
        return
    # Summaries: the backend's biased path gives them log(count), read from the same cache.
    bias = worker.log_bias["req-0"][0]
    torch.testing.assert_close(bias, slot_bias)
    biased = biased_decode_attention(query, kv_cache, cache_view, virtual_row, kept + tail, bias,
                                     layout.scale)
    want_biased = reference_attention(
        layout, query, visible_keys, visible_values, torch.cat([slot_bias, torch.zeros(tail)])
    )
    torch.testing.assert_close(biased, want_biased, atol=2e-2, rtol=2e-2)
    assert not torch.allclose(biased, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_cache_reads_back_what_the_cache_op_wrote(layout: Layout) -> None:
    """The write op is a copy on every x86 CPU, so every layout is read back here, `amx`
    included where the CPU cannot run its kernel."""
    n = 2 * layout.block + 6
    keys, values = layout.randn(n, HKV), layout.randn(n, HKV)
    block_row = torch.tensor([4, 1, 3], dtype=torch.int32)
    # A view into a larger buffer, as a layer's cache may be: reads start at its offset.
    kv_cache = layout.cache(7)[1:]
    write(kv_cache, layout, keys, values, block_row, 0)
    view = cache_layout(layout.isa, kv_cache, "auto")
    assert view.strided is not None, "every layout of vLLM 0.32 is a strided view"
    # The element-wise gather, for a layout that is no strided view, must read the same.
    elementwise = dataclasses.replace(view)
    elementwise.__dict__["strided"] = None
    assert elementwise.strided is None
    positions = torch.tensor([n - 1, 0, layout.block + 3, 5, layout.block - 1])
    for reader in (view, elementwise):
        got_keys, got_values = reader.gather(kv_cache, block_row, n)
        # Keys come back in float32 with positions contiguous (what scoring reads fastest),
        # values in the cache's dtype.
        assert got_keys.dtype == torch.float32 and got_keys.stride(1) == 1
        assert got_values.dtype == kv_cache.dtype
        assert torch.equal(got_keys, keys.transpose(0, 1).float())
        assert torch.equal(got_values, values.transpose(0, 1))
        # The values of a few positions alone (the kept tokens of a policy that reads none).
        assert torch.equal(reader.values_at(kv_cache, block_row, positions),
                           values[positions].transpose(0, 1))


def test_a_quantised_cache_has_no_read_back() -> None:
    """fp8 stores scaled, rounded values, not a copy: its summaries go without the bias."""
    kv_cache = torch.zeros(2, HKV, 32, 128, dtype=torch.uint8)
    assert cache_layout("vec", kv_cache, "fp8") is None


def test_the_layout_is_learnt_once_per_shape() -> None:
    first = block_layout("vec", torch.float32, HKV, 32, 64)
    assert block_layout("vec", torch.float32, HKV, 32, 64) is first


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_biased_attention_of_several_queries_is_causal(layout: Layout) -> None:
    torch.manual_seed(0)
    n, t = 2 * layout.block + 6, 3
    keys, values = layout.randn(n, HKV), layout.randn(n, HKV)
    block_row = torch.tensor([4, 1, 3], dtype=torch.int32)
    kv_cache = layout.cache(6)
    write(kv_cache, layout, keys, values, block_row, 0)
    queries = layout.randn(t, HQ)
    log_bias = torch.rand(5) * 3
    got = biased_decode_attention(queries, kv_cache, cache_layout(layout.isa, kv_cache, "auto"),
                                  block_row, n, log_bias, layout.scale)
    for i in range(t):
        seen = n - t + i + 1
        want = reference_attention(
            layout, queries[i : i + 1], keys[:seen].transpose(0, 1),
            values[:seen].transpose(0, 1), torch.cat([log_bias, torch.zeros(seen - 5)]),
        )
        torch.testing.assert_close(got[i : i + 1], want, atol=1e-4, rtol=1e-4)


def compress_in_chunks(chunks: list[tuple[int, int]], policy: str = "entropy") -> str:
    """Compress one 3-layer request whose prompt is computed in `chunks` (start, end); each
    chunk's queries sit after 5 rows of another request in the batch. Returns the plan digest.
    """
    layout = LAYOUTS[0]
    torch.manual_seed(0)
    n, num_layers = 8 * layout.block + 10, 3
    block_row = torch.tensor([11, 3, 7, 0, 9, 14, 2, 5, 12], dtype=torch.int32)
    caches = [layout.cache(16) for _ in range(num_layers)]
    queries = [layout.randn(n, HQ) for _ in range(num_layers)]
    for cache in caches:
        write(cache, layout, layout.randn(n, HKV), layout.randn(n, HKV), block_row, 0)
    worker = CompressionWorker()
    config = KVPolicyConfig(policy=policy, budget=0.25)
    worker.configure(config, layout.block, num_layers=num_layers)
    layer = SimpleNamespace(isa=layout.isa, _k_scale_float=1.0, _v_scale_float=1.0)
    for start, end in chunks:
        request = CaptureRequest("req-0", 5, start, end, worker.compressible_tokens(n, config),
                                 block_row, config, prompt_tokens=n)
        for i in range(num_layers):
            batch = torch.cat([layout.randn(5, HQ), queries[i][start:end]])
            worker.capture(request, i, layer, batch, caches[i], layout.scale, "auto")
        worker.compact({"req-0"})
        reports = worker.take_reports()
        assert ("req-0" in reports) == (end == n)  # compressed after the last chunk only
    return reports["req-0"].plan_digest


@pytest.mark.parametrize("policy", ["entropy", "snapkv", "src"])
def test_chunked_prefill_plans_what_one_chunk_plans(policy: str) -> None:
    """Queries gathered over chunks (the window straddles the last two) and keys read back
    from the cache give the plan of a prompt computed at once."""
    n = 8 * 32 + 10
    whole = compress_in_chunks([(0, n)], policy)
    assert compress_in_chunks([(0, 100), (100, n - 8), (n - 8, n)], policy) == whole
    assert compress_in_chunks([(0, n - 40), (n - 40, n)], policy) == whole


def test_short_prompts_are_not_compressed() -> None:
    worker = CompressionWorker()
    config = KVPolicyConfig(policy="entropy")
    worker.configure(config, 32, num_layers=30)
    assert worker.compressible_tokens(40, config) == 0
    assert worker.compressible_tokens(10 * 32 + 5, config) == 10 * 32


def test_a_request_choosing_none_is_not_compressed() -> None:
    worker = CompressionWorker()
    server = KVPolicyConfig(policy="entropy")
    worker.configure(server, 32, num_layers=30)
    assert worker.compressible_tokens(10 * 32, server.for_request({"kv_policy": "none"})) == 0
