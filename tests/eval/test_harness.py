"""A small real-model run of the evaluation harness (CPU, well under 3 minutes on 2 cores)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vllm_entropy_kv import assets
from vllm_entropy_kv.eval.attention import build_mask

pytestmark = pytest.mark.model

requires_assets = pytest.mark.skipif(
    not (assets.is_complete(assets.model_dir()) and assets.is_complete(assets.texts_dir())),
    reason="run `python -m vllm_entropy_kv.assets` first",
)


def test_mask_is_causal_within_chunk_and_open_to_cache() -> None:
    bias = torch.tensor([0.0, 2.0])
    mask = build_mask(q_len=2, kv_len=5, bias=bias, dtype=torch.float32)
    assert mask is not None
    assert mask[:, 1].eq(2.0).all() and mask[:, 2].eq(0).all()
    assert mask[0, 4] == float("-inf") and mask[1, 4] == 0 and mask[0, 3] == 0
    assert build_mask(1, 5, None, torch.float32) is None
    assert build_mask(4, 4, None, torch.float32) is None


@pytest.fixture(scope="module")
def model():
    from vllm_entropy_kv.eval.model import load_model

    return load_model()


@pytest.fixture(scope="module")
def document(model):
    from vllm_entropy_kv.eval.texts import perplexity_documents

    return perplexity_documents(model.encode, plays=0, britannica=1, n_context=512, n_continuation=64)[0]


def _eviction_policies() -> list[str]:
    from vllm_entropy_kv.policies import available_policies

    # A uniform-budget policy and one with per-layer budgets (its stream re-compresses layers
    # of different lengths).
    wanted = [p for p in ("streaming", "entropy", "h2o", "snapkv") if p in available_policies()]
    if not wanted:
        pytest.skip("no eviction policy registered yet")
    return wanted[:2]


@requires_assets
def test_harness_changes_nothing_at_keep_one(model, document) -> None:
    """`none`, and any eviction policy at keep=1.0, give the uncompressed model's perplexity."""
    from transformers import AutoModelForCausalLM

    from vllm_entropy_kv.eval.documents import run_documents
    from vllm_entropy_kv.eval.plans import variants

    stock = AutoModelForCausalLM.from_pretrained(model.path, attn_implementation="sdpa").eval()
    ids = torch.cat([document.context, document.continuation], dim=1)
    n = document.context.shape[1]
    with torch.no_grad():
        logits = stock(ids).logits[0].float()
    stock_ppl = math.exp(F.cross_entropy(logits[n:-1], ids[0, n + 1 :]).item())

    policies = ["none", *_eviction_policies()]
    rows = run_documents(
        model, [document], variants(policies), [1.0], reconstruction=True, heldout_queries=8
    )
    ppl = {r["variant"]: math.exp(r["nll"] / r["tokens"]) for r in rows if r["task"] == "ppl"}
    assert set(ppl) == set(policies)
    assert ppl["none"] == pytest.approx(stock_ppl, rel=1e-4)
    for name in policies:
        assert ppl[name] == pytest.approx(ppl["none"], rel=1e-4), name
    for r in rows:
        if r["task"] == "recon":
            assert max(r["relative"]) < 1e-8, r["variant"]


@requires_assets
def test_quick_run_writes_sane_results(tmp_path: Path) -> None:
    from vllm_entropy_kv.eval.__main__ import main

    policies = _eviction_policies()
    result = main(
        [
            "--quick",
            "--policies",
            ",".join(["none", *policies]),
            "--ratios",
            "0.25",
            "--tasks",
            "profile,ppl,recon,needle,stream",
            "--bias-ablation",
            "",
            "--out",
            str(tmp_path),
        ]
    )
    rows = result["rows"]
    ppl = [math.exp(r["nll"] / r["tokens"]) for r in rows if r["task"] == "ppl"]
    assert ppl and all(math.isfinite(p) and 1 < p < 1000 for p in ppl)
    kept = {r["variant"]: r["kept"] for r in rows if r["task"] == "ppl"}
    assert kept["none"] == 1.0
    assert all(abs(kept[p] - 0.25) < 0.02 for p in policies)
    needle = [r for r in rows if r["task"] == "needle"]
    assert needle and next(r for r in needle if r["variant"] == "none")["hit"]
    stream = [r for r in rows if r["task"] == "stream"]
    compressed = [r for r in stream if r["variant"] != "none"]
    assert {r["variant"] for r in compressed} == set(policies) & {"streaming", "entropy", "h2o"}
    assert all(r["compressions"] > 1 for r in compressed)
    assert all(max(p[1] for p in r["points"][1:]) <= 256 + 128 for r in compressed)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "full cache" in text and "Perplexity" in text and "vs full [95% CI]" in text
    assert (tmp_path / "img" / "ppl_vs_ratio.png").stat().st_size > 1000
    assert (tmp_path / "img" / "memory_over_time.png").stat().st_size > 1000


def test_headline_perplexity_interval_pairs_documents() -> None:
    from vllm_entropy_kv.eval.report import perplexity_interval

    def row(doc: str, variant: str, ratio: float, nll: float) -> dict:
        return {"task": "ppl", "doc": doc, "variant": variant, "ratio": ratio, "nll": nll,
                "tokens": 100}

    rows = [row("a", "none", 1.0, 200.0), row("b", "none", 1.0, 300.0),
            row("a", "snapkv", 0.25, 210.0), row("b", "snapkv", 0.25, 310.0),
            row("a", "snapkv", 0.5, 200.0)]
    # Both documents 10 nats worse over 100 tokens each: exp(0.1) - 1 = +10.5%, exactly.
    assert perplexity_interval(rows, "snapkv", 0.25) == "+10.5% [+10.5%, +10.5%]"
    assert perplexity_interval(rows, "snapkv", 0.5) == "+0.0% [+0.0%, +0.0%]"
    assert perplexity_interval(rows, "streaming", 0.25) == "–"


def _greedy_alone(model, kv, prompt: torch.Tensor, use_bias: bool, steps: int):
    """The reference: one state on its own DynamicCache (bias, no padding, no slot buffers)."""
    step = model.forward(prompt, kv, use_bias=use_bias, logits=slice(-1, None))
    first, tokens = step.logits[0, -1], []
    for _ in range(steps):
        tokens.append(int(step.logits[0, -1].argmax()))
        step = model.forward(torch.tensor([[tokens[-1]]]), step.kv, use_bias=use_bias,
                             logits=slice(-1, None))
    return first, model.tokenizer.decode(tokens)


@requires_assets
def test_batched_decoding_equals_one_state_at_a_time(model, document) -> None:
    """States of different lengths and biases decoded in stacked, padded batches give each
    state's own logits and greedy tokens."""
    from vllm_entropy_kv.eval.cache import apply_plans, stack
    from vllm_entropy_kv.eval.capture import prefill
    from vllm_entropy_kv.eval.decode import batches, greedy_answers
    from vllm_entropy_kv.eval.plans import make_plans
    from vllm_entropy_kv.policies import get_policy

    context, prompt = document.context[:, :-1], document.context[:, -1:]
    n = context.shape[1]
    layers = prefill(model, context, None).observations(32)
    cells = [("none", 1.0, True), ("entropy-merge", 0.25, True), ("entropy-merge", 0.25, False),
             ("streaming", 0.25, True), ("entropy", 0.5, True)]
    plans = [make_plans(get_policy(name), layers, ratio).plans for name, ratio, _ in cells]
    assert plans[1][0].num_summaries > 0, "the bias cells need summary tokens"
    use_bias = [bias for *_, bias in cells]
    states = [apply_plans(layers, p, n) for p in plans]
    steps = 12

    groups = batches(model, states)
    assert sorted(i for g in groups for i in g) == list(range(len(cells)))
    with torch.inference_mode():
        stacked = model.forward(prompt.expand(len(states), -1), stack(states, use_bias, room=1),
                                logits=slice(-1, None))
        answers = greedy_answers(model, states, use_bias, prompt, steps, [lambda _: False] * 5)
        for row, state in enumerate(states):
            first, alone = _greedy_alone(model, apply_plans(layers, plans[row], n), prompt,
                                         use_bias[row], steps)
            torch.testing.assert_close(stacked.logits[row, -1], first, rtol=1e-4, atol=1e-4)
            assert answers[row] == alone, cells[row]
    assert [s.physical_tokens() for s in states] == [
        [p.num_physical for p in plan] for plan in plans
    ], "decoding must not grow the caller's states"
