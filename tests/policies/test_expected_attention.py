"""Expected Attention against its definition written out position by position."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vllm_entropy_kv.policies import Budget, LayerObservation, Rope, get_policy
from vllm_entropy_kv.policies.expected_attention import averaged_rotation

D, THETA = 16, 10000.0


def _hf_rotate(x: torch.Tensor, position: int) -> torch.Tensor:
    """x [..., D] at `position` with transformers' Llama RoPE (rotate_half, GPT-NeoX)."""
    inv_freq = 1.0 / (THETA ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = position * inv_freq
    emb = torch.cat([freqs, freqs])
    q, _ = apply_rotary_pos_emb(x.double(), x.double(), emb.cos(), emb.sin(), unsqueeze_dim=0)
    return q.float().reshape(x.shape)


def test_rope_turns_as_transformers_llama_does() -> None:
    rope = Rope.from_theta(THETA, D, 64)
    x = torch.randn(3, D)
    for offset in (0, 1, 17, 63):
        turned = rope.rotate(x, rope.cos[offset], rope.sin[offset])
        torch.testing.assert_close(turned, _hf_rotate(x, offset), atol=1e-5, rtol=1e-5)


def test_partial_rotary_leaves_the_last_dims_alone() -> None:
    rope = Rope.from_theta(THETA, 8, 16)
    x = torch.randn(2, D)
    turned = rope.rotate(x, rope.cos[5], rope.sin[5])
    assert torch.equal(turned[:, 8:], x[:, 8:])


def _layer(n: int = 60, window: int = 6, q_heads: int = 4, kv_heads: int = 2, seed: int = 0,
           offset: int = 0) -> LayerObservation:
    gen = torch.Generator().manual_seed(seed)
    return LayerObservation(torch.randn(q_heads, window, D, generator=gen),
                            torch.randn(kv_heads, n, D, generator=gen),
                            torch.randn(kv_heads, n, D, generator=gen), D**-0.5,
                            query_offset=offset, rope=Rope.from_theta(THETA, D, 256))


def _expected_by_hand(obs: LayerObservation, future: int, covariance: bool, vnorm: bool
                      ) -> torch.Tensor:
    """[n]: every window query turned to every future position one at a time (transformers'
    RoPE), their mean and covariance per head, the Gaussian's expected logits, softmax,
    value norms, GQA groups then KV heads averaged."""
    hq, m, _ = obs.queries.shape
    hkv = obs.keys.shape[0]
    scores = []
    for head in range(hq):
        kv_head = head // (hq // hkv)
        moved = torch.stack([
            torch.stack([_hf_rotate(obs.queries[head, j], m - j + t) for t in range(future)]
                        ).mean(0)
            for j in range(m)
        ]).double()  # [m, D]
        mu = moved.mean(0)
        cov = (moved - mu).T @ (moved - mu) / m
        keys = obs.keys[kv_head].double()
        logits = obs.scale * keys @ mu
        if covariance:
            logits += obs.scale**2 / 2 * torch.einsum("nd,de,ne->n", keys, cov, keys)
        probs = logits.softmax(-1)
        if vnorm:
            probs = probs * obs.values[kv_head].double().norm(dim=-1)
        scores.append(probs)
    return torch.stack(scores).unflatten(0, (hkv, -1)).mean(1).mean(0).float()


@pytest.mark.parametrize("covariance", [False, True])
@pytest.mark.parametrize("vnorm", [False, True])
@pytest.mark.parametrize("offset", [0, 3])
def test_scores_equal_the_definition(covariance: bool, vnorm: bool, offset: int) -> None:
    obs = _layer(offset=offset)
    policy = get_policy("expected-attention", future_positions=20, use_covariance=covariance,
                        use_vnorm=vnorm)
    torch.testing.assert_close(policy.layer_scores(obs), _expected_by_hand(obs, 20, covariance,
                                                                          vnorm),
                               atol=1e-5, rtol=1e-4)


def test_averaged_rotation_covers_the_offsets_it_needs() -> None:
    rope = Rope.from_theta(THETA, D, 40)
    cos, sin = averaged_rotation(rope, 8, 32)  # offsets 1..39
    assert cos.shape == sin.shape == (8, D // 2)
    with pytest.raises(ValueError, match="offsets below 40"):
        averaged_rotation(rope, 8, 33)


def test_the_key_future_queries_point_at_is_kept() -> None:
    obs = _layer(n=200)
    rope = obs.rope
    assert rope is not None
    cos, sin = averaged_rotation(rope, obs.queries.shape[1], 64)
    target = rope.rotate(obs.queries.float(), cos, sin).mean(1)  # [Hq, D]
    keys = obs.keys.clone()
    keys[:, 100] = 4 * target.unflatten(0, (2, -1)).mean(1)
    plan = get_policy("expected-attention", future_positions=64).plan(
        [replace(obs, keys=keys)], Budget(keep=0.1, sink_tokens=4, recent_tokens=4))
    assert 100 in plan[0].keep.tolist()


def test_needs_the_models_rope() -> None:
    obs = replace(_layer(), rope=None)
    with pytest.raises(ValueError, match="LayerObservation.rope"):
        get_policy("expected-attention").plan([obs], Budget(keep=0.5))
