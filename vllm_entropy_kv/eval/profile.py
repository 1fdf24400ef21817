"""What the entropy paper looks at: normalised attention entropy per layer and head, and the
per-layer token budgets that entropy, the pyramid and a uniform split give."""

from __future__ import annotations

from collections.abc import Sequence

from vllm_entropy_kv.eval.capture import prefill
from vllm_entropy_kv.eval.model import Model
from vllm_entropy_kv.eval.plans import (
    DEFAULT_WINDOW,
    Variant,
    build_policies,
    make_plans,
    widest_window,
)
from vllm_entropy_kv.eval.results import Row
from vllm_entropy_kv.eval.texts import Document
from vllm_entropy_kv.policies import Budget
from vllm_entropy_kv.policies.stats import attention_stats


def run_profile(model: Model, doc: Document, policies: Sequence[str], ratio: float) -> list[Row]:
    """One row of task "profile": head entropies [L][Hq] over the last DEFAULT_WINDOW prompt
    queries and, per policy, the physical tokens of each layer at keep `ratio`."""
    chosen = build_policies([Variant(p) for p in policies])
    pf = prefill(model, doc.context, widest_window(list(chosen.values())))
    layers = pf.observations(None)
    entropy = [attention_stats(obs, DEFAULT_WINDOW).head_entropy.tolist() for obs in layers]
    budgets = {
        name: [p.num_physical for p in make_plans(policy, layers, ratio).plans]
        for name, policy in chosen.items()
    }
    return [
        {
            "task": "profile",
            "doc": doc.name,
            "context": pf.num_tokens,
            "ratio": ratio,
            "head_entropy": entropy,
            "budgets": budgets,
            "uniform": Budget(keep=ratio).tokens_per_layer(pf.num_tokens),
        }
    ]
