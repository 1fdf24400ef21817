"""Memory over a long stream: the article's step pattern.

A long text is fed in chunks. After each chunk the cache's size is recorded; when it exceeds a
budget (mean tokens per layer), the policy compresses it to a smaller size, observing the last
chunk's queries against everything cached (earlier summaries included, with their bias). Each
chunk is also scored (next-token NLL inside the chunk, over the cache as it stands), so the
stream's perplexity shows what the memory savings cost. See `recompress` for how layers of
different lengths are compressed again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vllm_entropy_kv.eval.cache import KVState, apply_plans
from vllm_entropy_kv.eval.capture import observations
from vllm_entropy_kv.eval.model import Model
from vllm_entropy_kv.eval.plans import Variant, build_policies, make_plans, widest_window
from vllm_entropy_kv.eval.progress import Progress
from vllm_entropy_kv.eval.results import Row
from vllm_entropy_kv.policies import KVPolicy, LayerObservation, LayerPlan


def cache_point(model: Model, kv: KVState) -> list[float]:
    """[tokens seen, mean physical tokens per layer, bytes as vLLM stores them (bf16)]."""
    physical = kv.physical_tokens() or [0]
    return [
        kv.position,
        sum(physical) / len(physical),
        sum(physical) * model.kv_bytes_per_token_layer,
    ]


def recompress(policy: KVPolicy, layers: list[LayerObservation], tokens: int) -> list[LayerPlan]:
    """Plans that bring the cache to `tokens` per layer on average.

    While every layer holds the same tokens, the policy plans all layers at once (its own
    per-layer allocation). Once a policy with per-layer budgets has compressed, layers differ in
    length, which the policy contract does not allow in one call: each layer is then planned on
    its own at the same keep fraction, so the allocation of the first compression is kept in
    proportion.
    """
    lengths = [obs.num_tokens for obs in layers]
    if len(set(lengths)) == 1:
        return make_plans(policy, layers, float(tokens)).plans
    fraction = min(1.0, tokens * len(lengths) / sum(lengths))
    return [make_plans(policy, [obs], fraction).plans[0] for obs in layers]


def run_stream(
    model: Model,
    variants: Sequence[Variant],
    text_ids: torch.Tensor,
    *,
    chunk: int,
    budget_tokens: int,
    compress_to: int,
) -> list[Row]:
    """One row of task "stream" per variant: the cache size after every chunk and compression."""
    policies = build_policies(variants)
    window = widest_window(list(policies.values()))
    record = slice(None) if window is None else slice(-window, None)
    chunks = [text_ids[:, i : i + chunk] for i in range(0, text_ids.shape[1] - 1, chunk)]
    chunks = [c for c in chunks if c.shape[1] >= 2]
    progress = Progress("stream", len(variants) * len(chunks))
    rows: list[Row] = []
    for variant in variants:
        policy = policies[variant.policy]
        kv = KVState.empty()
        points: list[list[float]] = [cache_point(model, kv)]
        nll, tokens, compressions = 0.0, 0, 0
        for ids in chunks:
            m = ids.shape[1]
            step = model.forward(
                ids, kv, record=record, use_bias=variant.use_bias, logits=slice(0, m - 1)
            )
            assert step.logits is not None
            nll += float(F.cross_entropy(step.logits[0], ids[0, 1:], reduction="sum"))
            tokens += m - 1
            points.append(cache_point(model, kv))
            if not variant.is_reference and points[-1][1] > budget_tokens:
                layers = observations(step.records, None, model.rope)
                prior = [kv.layer_bias(i) for i in range(len(layers))]
                plans = recompress(policy, layers, compress_to)
                kv = apply_plans(layers, plans, kv.position, prior)
                compressions += 1
                points.append(cache_point(model, kv))
            progress.step(
                f"{variant.label}: {points[-1][0]:.0f} seen, "
                f"{points[-1][1]:.0f} cached, stream ppl {torch.tensor(nll / tokens).exp():.2f}"
            )
        rows.append(
            {
                "task": "stream",
                "variant": variant.label,
                "policy": variant.policy,
                "bias": variant.use_bias,
                "chunk": chunk,
                "budget_tokens": budget_tokens,
                "compress_to": compress_to,
                "points": points,
                "nll": nll,
                "tokens": tokens,
                "compressions": compressions,
            }
        )
    return rows
