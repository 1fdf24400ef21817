"""The long-document sweep: perplexity and attention-output reconstruction.

Both measures share one prefill per document: the context is prefilled once with its queries
recorded, every (policy, keep ratio) plans from those observations, and
- perplexity: the continuation is scored over the compressed cache;
- reconstruction: the continuation's first queries, recorded during the full-cache pass, attend
  to the full and the compressed prompt cache, layer by layer; the plans' memory is accounted
  FAIR (effective tokens) and REAL (bytes) with SRC's helpers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_entropy_kv.eval.cache import apply_plans
from vllm_entropy_kv.eval.capture import prefill
from vllm_entropy_kv.eval.model import Model
from vllm_entropy_kv.eval.perplexity import score_continuation
from vllm_entropy_kv.eval.plans import Match, Planner, Variant, build_policies, cases, widest_window
from vllm_entropy_kv.eval.progress import Progress
from vllm_entropy_kv.eval.reconstruction import Reference, layer_errors, memory_accounting
from vllm_entropy_kv.eval.results import Row
from vllm_entropy_kv.eval.texts import Document
from vllm_entropy_kv.policies import LayerPlan


def run_documents(
    model: Model,
    documents: Sequence[Document],
    variants: Sequence[Variant],
    ratios: Sequence[float],
    *,
    perplexity: bool = True,
    reconstruction: bool = True,
    heldout_queries: int = 64,
    match: Match = "real",
) -> list[Row]:
    """Rows of task "ppl" and "recon", one per document, variant and ratio."""
    policies = build_policies(variants)
    window = widest_window(list(policies.values()))
    todo = cases(variants, ratios)
    progress = Progress("documents", len(documents) * len(todo))
    rows: list[Row] = []
    for doc in documents:
        n = doc.context.shape[1]
        pf = prefill(model, doc.context, window)
        layers = pf.observations(None)
        planner = Planner(policies, layers, match)
        # The full-cache pass gives the reference perplexity and the held-out queries.
        full = identity_plans(len(layers), n)
        ref = score_continuation(
            model, apply_plans(layers, full, n), doc.continuation, record=slice(0, heldout_queries)
        )
        reference = Reference.build(layers, {i: r.queries for i, r in ref.records.items()})
        progress.note(f"{doc.name}: n={n}, full-cache ppl {ref.perplexity:.3f}")
        base = {"doc": doc.name, "source": doc.source, "context": n}
        for variant, ratio in todo:
            result = planner(variant.policy, ratio)
            common = {
                **base,
                "variant": variant.label,
                "policy": variant.policy,
                "bias": variant.use_bias,
                "ratio": ratio,
            }
            message = f"{doc.name} {variant.label} @{ratio:g}: kept {result.kept_fraction:.3f}"
            if perplexity:
                kv = apply_plans(layers, result.plans, n)
                scored = score_continuation(model, kv, doc.continuation, use_bias=variant.use_bias)
                rows.append(
                    {
                        **common,
                        "task": "ppl",
                        "nll": scored.nll,
                        "tokens": scored.tokens,
                        "kept": result.kept_fraction,
                        "budget_keep": result.keep,
                        "plan_seconds": result.seconds,
                        "full_nll": ref.nll,
                        "full_tokens": ref.tokens,
                    }
                )
                message += f" ppl {scored.perplexity:.3f} (full {ref.perplexity:.3f})"
            if reconstruction:
                err = layer_errors(layers, result.plans, reference, variant.use_bias)
                rows.append(
                    {
                        **common,
                        "task": "recon",
                        "mse": err.mse,
                        "relative": err.relative,
                        "kept": result.kept_fraction,
                        **memory_accounting(result.plans, n, model.num_kv_heads, model.head_dim),
                    }
                )
                message += f" rel.err {sum(err.relative) / len(err.relative):.4f}"
            progress.step(message)
    return rows


def identity_plans(num_layers: int, n: int) -> list[LayerPlan]:
    """Plans that keep the whole prompt in every layer (the full cache)."""
    keep = torch.arange(n)
    return [LayerPlan(keep=keep) for _ in range(num_layers)]
