"""The worker's compaction through vLLM's real CPU cache op and attention kernel, no server:
after compaction, the kernel reading the virtual block row must compute exactly the attention
over the kept tokens plus the tail (the data path the engine relies on)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm import _custom_ops as ops  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa  # noqa: E402

from vllm_entropy_kv.config import KVPolicyConfig  # noqa: E402
from vllm_entropy_kv.engine.worker import CaptureRequest, CompressionWorker  # noqa: E402

BLOCK, HQ, HKV, D = 32, 9, 3, 64
SCALE = D**-0.5


def write(kv_cache, isa, keys, values, block_row, first_position):
    """Store tokens at their logical positions of `block_row`, as vLLM's prefill does."""
    positions = torch.arange(first_position, first_position + keys.shape[0])
    slots = block_row[positions // BLOCK].to(torch.int64) * BLOCK + positions % BLOCK
    key_cache, value_cache = kv_cache.view(kv_cache.shape[0], HKV, BLOCK * 2, D).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa)


def kernel_attention(kv_cache, isa, query, block_row, seq_len):
    """One decode query through vLLM's CPU attention kernel."""
    key_cache, value_cache = kv_cache.view(kv_cache.shape[0], HKV, BLOCK * 2, D).chunk(2, dim=2)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32)
    query_start = torch.tensor([0, 1], dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D, seq_lens=seq_lens,
        dtype=torch.bfloat16, query_start_loc=query_start, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=False,
    )
    output = torch.empty(1, HQ, D, dtype=torch.bfloat16)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output,
        query_start_loc=query_start, seq_lens=seq_lens, scale=SCALE, causal=True,
        alibi_slopes=None, sliding_window=-1, block_table=block_row[None].to(torch.int32),
        softcap=0, scheduler_metadata=metadata, s_aux=None,
    )
    return output.float()


def reference_attention(query, keys, values):
    """softmax(q K^T) V per query head, GQA: head h reads KV head h // (HQ // HKV)."""
    group = HQ // HKV
    k = keys.float().repeat_interleave(group, dim=1)  # [t, HQ, D]
    v = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,thd->ht", query[0].float(), k) * SCALE
    return torch.einsum("ht,thd->hd", scores.softmax(-1), v)[None]


@pytest.mark.parametrize("policy", ["streaming", "snapkv", "entropy"])
def test_compacted_cache_reads_as_kept_tokens_plus_tail(policy: str) -> None:
    torch.manual_seed(0)
    isa = _get_attn_isa(torch.bfloat16, BLOCK, D)
    prompt, tail = 8 * BLOCK, 10  # 8 whole blocks, then a partial block decode appends to
    n = prompt + tail
    keys = torch.randn(n, HKV, D, dtype=torch.bfloat16)
    values = torch.randn(n, HKV, D, dtype=torch.bfloat16)
    queries = torch.randn(n, HQ, D, dtype=torch.bfloat16)
    block_row = torch.tensor([11, 3, 7, 0, 9, 14, 2, 5, 12], dtype=torch.int32)
    kv_cache = torch.zeros(16, HKV, BLOCK, 2 * D, dtype=torch.bfloat16)
    write(kv_cache, isa, keys, values, block_row, 0)

    worker = CompressionWorker()
    config = KVPolicyConfig(policy=policy, budget=0.25)
    worker.configure(config, BLOCK, num_layers=1)
    layer = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    request = CaptureRequest("req-0", 0, worker.compressible_tokens(n, config), block_row, config)
    worker.capture(request, 0, layer, queries, keys, values, kv_cache, SCALE, "auto")
    worker.compact()
    report = worker.take_reports()["req-0"]
    first, last = report.freed_ranges[0]
    kept = report.kept_tokens[0]
    assert kept == first * BLOCK and last == prompt // BLOCK and kept < prompt

    # What the policy kept, recomputed: the same plan from the same observation.
    from vllm_entropy_kv.policies import Budget, LayerObservation, get_policy

    observation = LayerObservation(
        queries=queries[prompt - 32 : prompt].transpose(0, 1),
        keys=keys[:prompt].transpose(0, 1), values=values[:prompt].transpose(0, 1),
        scale=SCALE,
    )
    keep = get_policy(policy).plan([observation], Budget(0.25, block_size=BLOCK))[0].keep
    assert keep.numel() == kept

    virtual_row = torch.cat([block_row[:first], block_row[last:]])
    query = torch.randn(1, HQ, D, dtype=torch.bfloat16)
    got = kernel_attention(kv_cache, isa, query, virtual_row, kept + tail)
    visible = torch.cat([keep, torch.arange(prompt, n)])
    want = reference_attention(query, keys[visible], values[visible])
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_short_prompts_are_not_compressed() -> None:
    worker = CompressionWorker()
    config = KVPolicyConfig(policy="entropy")
    worker.configure(config, BLOCK, num_layers=30)
    assert worker.compressible_tokens(40, config) == 0
    assert worker.compressible_tokens(10 * BLOCK + 5, config) == 10 * BLOCK


def test_a_request_choosing_none_is_not_compressed() -> None:
    worker = CompressionWorker()
    server = KVPolicyConfig(policy="entropy")
    worker.configure(server, BLOCK, num_layers=30)
    assert worker.compressible_tokens(10 * BLOCK, server.for_request({"kv_policy": "none"})) == 0
