"""Attention statistics against a naive oracle that builds the full matrices."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from vllm_entropy_kv.policies import LayerObservation, LayerPlan
from vllm_entropy_kv.policies.stats import (
    aggregate_heads,
    attention_output,
    attention_probs,
    attention_stats,
    attention_stats_batch,
    compressed_kv,
    layer_entropies,
    prompt_length,
    reduce_groups,
)


def naive(obs: LayerObservation, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(head entropy [Hq], head scores [Hq, n], token entropy [n]) the slow, obvious way."""
    q, k = obs.queries[:, -m:].float(), obs.keys.float()
    hq, hkv, n = q.shape[0], k.shape[0], k.shape[1]
    kk = k.repeat_interleave(hq // hkv, 0)  # query head h reads KV head h // G
    logits = q @ kk.transpose(1, 2) * obs.scale
    pos = torch.arange(n - m, n)[:, None]
    keypos = torch.arange(n)[None]
    p = logits.masked_fill(keypos > pos, float("-inf")).softmax(-1)
    ent = -torch.special.xlogy(p, p).sum(-1)
    norm = (pos.squeeze(1) + 1).float().log()
    head_ent = torch.where(norm > 0, ent / norm.clamp_min(1e-12), torch.zeros_like(ent)).mean(-1)
    mass = p.sum((0, 1))
    tok = mass.log() - torch.special.xlogy(p, p).sum((0, 1)) / mass
    pairs = ((keypos <= pos).sum(0) * hq).float()
    tok = torch.where(pairs > 1, tok / pairs.log(), torch.zeros_like(tok)).clamp(0, 1)
    return head_ent, p.sum(1), tok


@pytest.mark.parametrize("m,chunk", [(8, 1 << 22), (60, 1 << 22), (60, 500), (60, 1)])
def test_matches_naive_oracle(make_layers, m: int, chunk: int) -> None:
    obs = make_layers(num_layers=1, q_heads=6, kv_heads=2, n=60, window=60, seed=3)[0]
    stats = attention_stats(obs, m, token_entropy=True, chunk_elements=chunk)
    head_ent, head_scores, tok = naive(obs, m)
    torch.testing.assert_close(stats.head_entropy, head_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.head_scores, head_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.token_entropy, tok, atol=1e-5, rtol=1e-5)
    assert stats.num_queries == m


@pytest.mark.parametrize("chunk", [None, 500, 1])
def test_query_max_keeps_each_keys_largest_share(make_layers, chunk: int | None) -> None:
    """query_reduce "max": a key's score is the most any one window query gives it, in every
    batching; entropies are unchanged, and token entropy (a sum) refuses it."""
    layers = make_layers(num_layers=3, q_heads=6, kv_heads=2, n=60, window=16, seed=5)
    stats = attention_stats_batch(layers, 16, query_reduce="max", chunk_elements=chunk)
    for layer, obs in enumerate(layers):
        probs = attention_probs(obs.queries, obs.keys, obs.scale)
        torch.testing.assert_close(stats.head_scores[layer], probs.amax(1))
    summed = attention_stats_batch(layers, 16, chunk_elements=chunk)
    torch.testing.assert_close(stats.head_entropy, summed.head_entropy)
    with pytest.raises(ValueError, match="query_reduce must be 'sum' or 'max'"):
        attention_stats_batch(layers, 16, query_reduce="mean")
    with pytest.raises(ValueError, match="'sum' with token_entropy"):
        attention_stats_batch(layers, 16, query_reduce="max", token_entropy=True)


def test_uses_last_queries_and_causal_mask(make_layers) -> None:
    obs = make_layers(num_layers=1, n=40, window=10)[0]
    probs = attention_probs(obs.queries, obs.keys, obs.scale)
    # Window query i sits at position 30 + i and sees keys <= 30 + i only.
    for i in range(10):
        assert float(probs[:, i, 31 + i:].abs().sum()) == 0.0
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 10))
    # Key 39 (the last) is seen by the last query alone.
    stats = attention_stats(obs, 10, entropy=False)
    torch.testing.assert_close(stats.head_scores[:, 39], probs[:, 9, 39])
    assert stats.head_entropy is None


def test_entropy_is_normalised() -> None:
    n, d = 50, 8
    keys = torch.zeros(1, n, d)  # every key alike: uniform attention, entropy 1
    obs = LayerObservation(torch.randn(2, 4, d), keys, torch.randn(1, n, d), 1.0)
    assert attention_stats(obs, 4).layer_entropy == pytest.approx(1.0, abs=1e-5)
    keys = torch.zeros(1, n, d)
    keys[0, 0, 0] = 100.0  # one key dominates: entropy ~ 0
    queries = torch.zeros(2, 4, d)
    queries[..., 0] = 1.0
    obs = LayerObservation(queries, keys, torch.randn(1, n, d), 1.0)
    assert attention_stats(obs, 4).layer_entropy < 1e-3


def test_gqa_head_mapping() -> None:
    """Query heads 0-1 read KV head 0, heads 2-3 read KV head 1."""
    n, d = 20, 4
    keys = torch.zeros(2, n, d)
    keys[0, 5, 0] = 50.0  # KV head 0 points at token 5, KV head 1 at token 12
    keys[1, 12, 0] = 50.0
    queries = torch.zeros(4, 3, d)
    queries[..., 0] = 1.0
    obs = LayerObservation(queries, keys, torch.zeros(2, n, d), 1.0)
    stats = attention_stats(obs, 3)
    assert stats.head_scores[:2].argmax(-1).tolist() == [5, 5]
    assert stats.head_scores[2:].argmax(-1).tolist() == [12, 12]
    per_kv = stats.kv_head_scores()
    assert per_kv.shape == (2, n)
    assert per_kv[0].argmax() == 5 and per_kv[1].argmax() == 12
    layer = stats.token_scores()
    assert layer.shape == (n,)
    assert set(torch.topk(layer, 2).indices.tolist()) == {5, 12}


def test_group_reduce() -> None:
    scores = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [2.0, 2.0]])
    expected_max = torch.tensor([[3.0, 2.0], [2.0, 4.0]])
    torch.testing.assert_close(reduce_groups(scores, 2, "max"), expected_max)
    expected_sum = torch.tensor([[4.0, 2.0], [2.0, 6.0]])
    torch.testing.assert_close(reduce_groups(scores, 2, "sum"), expected_sum)
    torch.testing.assert_close(aggregate_heads(scores, 2), torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match="group_reduce"):
        reduce_groups(scores, 2, "median")  # type: ignore[arg-type]


def test_head_max_keeps_what_adakv_flattened_top_k_covers() -> None:
    """AdaKV takes the top entries of all heads' scores together; under one shared token set
    the first B distinct tokens of that walk are the B tokens whose best head scores highest."""
    scores = torch.rand(4, 3, 200, generator=torch.Generator().manual_seed(3))  # [L, Hkv, n]
    layer = aggregate_heads(scores, 3, head_reduce="max")
    for i in range(scores.shape[0]):
        walk = scores[i].flatten().argsort(descending=True) % scores.shape[-1]
        covered = list(dict.fromkeys(walk.tolist()))[:50]
        assert set(layer[i].topk(50).indices.tolist()) == set(covered)
    with pytest.raises(ValueError, match="head_reduce"):
        aggregate_heads(scores, 3, head_reduce="sum")  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", [None, 1 << 12])
def test_stacked_layers_and_keys_in_place_agree(make_layers, chunk: int | None) -> None:
    """The GPU's batching (layers stacked per step) and the CPU's (each layer's keys in place,
    here in the engine's storage with positions contiguous) compute the same statistics;
    `chunk` 4096 also splits the window into query chunks."""
    layers = make_layers(num_layers=5, q_heads=6, kv_heads=2, n=300, window=16, seed=4)
    engine_keys = [replace(o, keys=o.keys.transpose(1, 2).contiguous().transpose(1, 2))
                   for o in layers]
    stacked = attention_stats_batch(layers, 16, token_entropy=True, chunk_elements=chunk,
                                    stacked=True)
    in_place = attention_stats_batch(engine_keys, 16, token_entropy=True,
                                     chunk_elements=chunk, stacked=False)
    for part in ("head_scores", "head_entropy", "token_entropy"):
        torch.testing.assert_close(getattr(in_place, part), getattr(stacked, part),
                                   atol=1e-5, rtol=1e-5, msg=lambda m, p=part: f"{p}: {m}")


def test_half_precision_inputs_compute_in_float32(make_layers) -> None:
    obs32 = make_layers(num_layers=1, n=64, window=8)[0]
    obs16 = LayerObservation(obs32.queries.bfloat16(), obs32.keys.bfloat16(),
                             obs32.values.bfloat16(), obs32.scale)
    s16 = attention_stats(obs16, 8)
    assert s16.head_scores.dtype == torch.float32
    ref = attention_stats(LayerObservation(obs16.queries.float(), obs16.keys.float(),
                                           obs16.values.float(), obs16.scale), 8)
    torch.testing.assert_close(s16.head_scores, ref.head_scores)


def test_layer_entropies_and_prompt_length(make_layers) -> None:
    layers = make_layers(num_layers=3, sharpness=[0.2, 1.0, 5.0])
    ents = layer_entropies([attention_stats(o) for o in layers])
    assert ents.shape == (3,)
    assert ents[0] > ents[1] > ents[2]  # sharper queries, lower entropy
    assert prompt_length(layers) == 200
    with pytest.raises(ValueError, match="prompt length"):
        prompt_length(layers + make_layers(num_layers=1, n=50))
    with pytest.raises(ValueError, match="no layers"):
        prompt_length([])


def test_compressed_kv_applies_log_count_bias(make_layers) -> None:
    obs = make_layers(num_layers=1, n=30, window=4)[0]
    plan = LayerPlan(
        keep=torch.tensor([0, 5, 29]),
        summary_keys=torch.zeros(2, 2, 16),
        summary_values=torch.ones(2, 2, 16),
        summary_counts=torch.tensor([3, 7]),
    )
    keys, values, bias = compressed_kv(obs, plan)
    assert keys.shape == (2, 5, 16) and values.shape == (2, 5, 16)
    torch.testing.assert_close(bias, torch.tensor([0.0, 0.0, 0.0, math.log(3), math.log(7)]))
    out, probs = attention_output(obs.queries, keys, values, obs.scale, bias)
    assert out.shape == (4, 4, 16)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 4))


def test_queries_after_the_keys_see_every_key_before_them() -> None:
    """query_offset: the engine scores a prompt's whole blocks with its true last queries."""
    gen = torch.Generator().manual_seed(3)
    n, offset, window, d = 20, 3, 6, 8
    obs = LayerObservation(torch.randn(2, window, d, generator=gen),
                           torch.randn(1, n, d, generator=gen),
                           torch.randn(1, n, d, generator=gen), 0.5, query_offset=offset)
    first = n + offset - window  # 17: queries at 17..22 over keys 0..19
    want = torch.zeros(2, n)
    for i in range(window):
        visible = min(first + i + 1, n)
        logits = obs.queries[:, i] @ obs.keys[0, :visible].T * 0.5
        want[:, :visible] += logits.softmax(-1)
    stats = attention_stats(obs, window)
    torch.testing.assert_close(stats.head_scores, want)
    assert stats.head_entropy is not None and bool((stats.head_entropy > 0).all())
