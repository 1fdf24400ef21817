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
from vllm_entropy_kv.engine.summaries import (  # noqa: E402
    bias_supported,
    biased_decode_attention,
    gather_kv,
)
from vllm_entropy_kv.engine.worker import CaptureRequest, CompressionWorker  # noqa: E402
from vllm_entropy_kv.policies import Budget, LayerObservation, get_policy  # noqa: E402
from vllm_entropy_kv.policies.stats import attention_output, compressed_kv  # noqa: E402

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


def reference_attention(query, keys, values, log_bias=None):
    """[1, HQ, D] query over [HKV, t, D] keys/values (`attention_output`, GQA-aware)."""
    out, _ = attention_output(query.transpose(0, 1), keys, values, SCALE, log_bias)
    return out.transpose(0, 1)


@pytest.mark.parametrize("policy", ["streaming", "snapkv", "entropy", "entropy-merge", "src"])
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
    request = CaptureRequest("req-0", 0, worker.compressible_tokens(n, config), block_row, config,
                             prompt_tokens=n)
    worker.capture(request, 0, layer, queries, keys, values, kv_cache, SCALE, "auto")
    worker.compact()
    report = worker.take_reports()["req-0"]
    first, last = report.freed_ranges[0]
    kept = report.kept_tokens[0]
    assert kept == first * BLOCK and last == prompt // BLOCK and kept < prompt

    # What the policy kept, recomputed: the same plan from the same observation.
    observation = LayerObservation(
        queries=queries[n - 32 : n].transpose(0, 1),
        keys=keys[:prompt].transpose(0, 1), values=values[:prompt].transpose(0, 1),
        scale=SCALE, query_offset=tail,
    )
    plan = get_policy(policy).plan([observation], Budget(0.25, block_size=BLOCK))[0]
    assert plan.num_physical == kept
    slot_keys, slot_values, slot_bias = compressed_kv(observation, plan)
    visible_keys = torch.cat([slot_keys, keys[prompt:].transpose(0, 1)], dim=1)
    visible_values = torch.cat([slot_values, values[prompt:].transpose(0, 1)], dim=1)

    virtual_row = torch.cat([block_row[:first], block_row[last:]])
    query = torch.randn(1, HQ, D, dtype=torch.bfloat16)
    # The stock kernel reads the kept tokens, the summaries (unbiased) and the tail.
    got = kernel_attention(kv_cache, isa, query, virtual_row, kept + tail)
    want = reference_attention(query, visible_keys, visible_values)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    if plan.num_summaries == 0:
        assert "req-0" not in worker.log_bias
        return
    # Summaries: the backend's biased path gives them log(count), read from the same cache.
    bias = worker.log_bias["req-0"][0]
    torch.testing.assert_close(bias, slot_bias)
    biased = biased_decode_attention(query, kv_cache, virtual_row, kept + tail, bias, SCALE)
    want_biased = reference_attention(
        query, visible_keys, visible_values, torch.cat([slot_bias, torch.zeros(tail)])
    )
    torch.testing.assert_close(biased, want_biased, atol=2e-2, rtol=2e-2)
    assert not torch.allclose(biased, want, atol=2e-2, rtol=2e-2)


def test_cache_reads_back_what_the_cache_op_wrote() -> None:
    isa = _get_attn_isa(torch.bfloat16, BLOCK, D)
    if not bias_supported(isa, "auto"):
        pytest.skip(f"the biased path reads the 'vec' layout only; this machine uses {isa!r}")
    keys = torch.randn(70, HKV, D, dtype=torch.bfloat16)
    values = torch.randn(70, HKV, D, dtype=torch.bfloat16)
    block_row = torch.tensor([4, 1, 3], dtype=torch.int32)
    kv_cache = torch.zeros(6, HKV, BLOCK, 2 * D, dtype=torch.bfloat16)
    write(kv_cache, isa, keys, values, block_row, 0)
    got_keys, got_values = gather_kv(kv_cache, block_row, 70)
    assert torch.equal(got_keys, keys.transpose(0, 1))
    assert torch.equal(got_values, values.transpose(0, 1))


def test_biased_attention_of_several_queries_is_causal() -> None:
    isa = _get_attn_isa(torch.bfloat16, BLOCK, D)
    if not bias_supported(isa, "auto"):
        pytest.skip(f"the biased path reads the 'vec' layout only; this machine uses {isa!r}")
    torch.manual_seed(0)
    n, t = 70, 3
    keys = torch.randn(n, HKV, D, dtype=torch.bfloat16)
    values = torch.randn(n, HKV, D, dtype=torch.bfloat16)
    block_row = torch.tensor([4, 1, 3], dtype=torch.int32)
    kv_cache = torch.zeros(6, HKV, BLOCK, 2 * D, dtype=torch.bfloat16)
    write(kv_cache, isa, keys, values, block_row, 0)
    queries = torch.randn(t, HQ, D, dtype=torch.bfloat16)
    log_bias = torch.rand(5) * 3
    got = biased_decode_attention(queries, kv_cache, block_row, n, log_bias, SCALE)
    for i in range(t):
        seen = n - t + i + 1
        want = reference_attention(
            queries[i : i + 1], keys[:seen].transpose(0, 1), values[:seen].transpose(0, 1),
            torch.cat([log_bias, torch.zeros(seen - 5)]),
        )
        torch.testing.assert_close(got[i : i + 1], want, atol=1e-4, rtol=1e-4)


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
