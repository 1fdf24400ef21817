"""The benchmark's tables (Markdown, ratios to `none`) and plots (PNG)."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_entropy_kv import assets
from vllm_entropy_kv.bench.probes import Batch, Cell, Timing
from vllm_entropy_kv.bench.sections import table
from vllm_entropy_kv.cpu import cpu_info
from vllm_entropy_kv.eval.perplexity import Scored, perplexity_ratio


@dataclass
class Results:
    """Everything one run measured, keyed by cell label (and prompt length)."""

    single: dict[tuple[str, int], Timing] = field(default_factory=dict)
    batch: dict[str, Batch] = field(default_factory=dict)
    capacity: dict[str, Batch] = field(default_factory=dict)
    needle: dict[str, int] = field(default_factory=dict)
    needle_cases: int = 0
    prefill_seconds: dict[str, float] = field(default_factory=dict)
    perplexity: dict[str, list[Scored]] = field(default_factory=dict)  # one per document


def attention_layout(dtype: str, block_size: int) -> str:
    """The KV cache layout vLLM's CPU attention picks for the served model ('?' for a dtype
    torch does not name)."""
    from vllm_entropy_kv.engine.cache_layout import attention_isa

    config = json.loads((assets.prepare_model() / "config.json").read_text())
    head_size = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    torch_dtype = getattr(torch, dtype, None)
    return attention_isa(torch_dtype, block_size, head_size) if torch_dtype else "?"


def machine_description(dtype: str, block_size: int) -> str:
    """The served model and dtype, the CPU, its ISA and the KV cache layout vLLM's attention
    picks there: what every benchmark header names."""
    layout = attention_layout(dtype, block_size)
    return (f"model SmolLM2-135M-Instruct ({dtype}, vLLM 0.32.0 CPU, `--enforce-eager`), "
            f"CPU {cpu_info().describe()}, {len(os.sched_getaffinity(0))} cores, "
            f"attention layout '{layout}' ({block_size}-token blocks)")


# Student's t, two-sided 95%, by degrees of freedom (a benchmark has a few rounds).
_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
          9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def geometric_mean_interval(ratios: Sequence[float]) -> tuple[float, float, float]:
    """The geometric mean of paired ratios and its 95% t-interval (a t-interval of the mean
    log-ratio): (mean, low, high); the interval is the mean itself for one ratio."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return (math.exp(mean),) * 3
    df = len(logs) - 1
    t = _T_975[max(d for d in _T_975 if d <= df)]
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "–"
    return f"{value / reference:.2f}x"


def single_table(results: Results, cells: Sequence[Cell], lengths: Sequence[int]) -> str:
    rows = []
    for length in lengths:
        base = results.single.get(("none", length))
        for cell in cells:
            t = results.single.get((cell.label, length))
            if t is None:
                continue
            rows.append([
                cell.policy, "1" if cell.policy == "none" else f"{cell.budget:g}", t.prompt_tokens,
                f"{t.ttft_s:.2f}", ratio(t.ttft_s, base and base.ttft_s),
                f"{t.tpot_s * 1000:.1f}", ratio(t.tpot_s, base and base.tpot_s),
                f"{t.output_tokens / t.total_s:.1f}", f"{t.peak_kv_fraction:.2%}",
                ratio(t.peak_kv_fraction, base and base.peak_kv_fraction),
            ])
    return table(["policy", "budget", "prompt tokens", "TTFT s", "TTFT vs none",
                  "TPOT ms", "TPOT vs none", "tokens/s", "peak KV use", "vs none"], rows)


def batch_table(batches: dict[str, Batch], cells: Sequence[Cell]) -> str:
    base = batches.get("none")
    rows = []
    for cell in cells:
        b = batches.get(cell.label)
        if b is None:
            continue
        rows.append([
            cell.label, len(b.timings), b.peak_running,
            ratio(b.peak_running, base and base.peak_running), b.preemptions,
            f"{b.mean_ttft_s:.1f}", f"{b.mean_tpot_s * 1000:.1f}",
            ratio(b.mean_tpot_s, base and base.mean_tpot_s),
            _ms(b.all_decoding_tpot_s),
            ratio(b.all_decoding_tpot_s, base and base.all_decoding_tpot_s),
            f"{b.output_tokens_per_s:.2f}", ratio(b.output_tokens_per_s,
                                                  base and base.output_tokens_per_s),
            f"{b.peak_kv_fraction:.1%}",
        ])
    return table(["cell", "requests", "peak running", "vs none", "preemptions", "mean TTFT s",
                  "mean TPOT ms", "TPOT vs none", "TPOT all decoding ms", "vs none",
                  "output tokens/s", "vs none", "peak KV use"], rows)


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.1f}"


def needle_table(results: Results, cells: Sequence[Cell]) -> str:
    base = results.needle.get("none")
    rows = [[cell.label, f"{results.needle[cell.label]}/{results.needle_cases}",
             ratio(results.needle[cell.label], base)]
            for cell in cells if cell.label in results.needle]
    return table(["cell", "hits", "vs none"], rows)


def perplexity_table(results: Results, cells: Sequence[Cell]) -> str:
    """Token-weighted perplexity over the documents, and its ratio to `none` with a 95%
    interval from a paired bootstrap over documents."""
    base = results.perplexity.get("none")
    rows = []
    for cell in cells:
        scores = results.perplexity.get(cell.label)
        if scores is None:
            continue
        pooled = Scored(sum(s.nll for s in scores), sum(s.tokens for s in scores))
        vs_none, interval = "–", "–"
        if base:
            mean, low, high = perplexity_ratio(scores, base)
            vs_none, interval = f"{mean:.3f}x", f"[{low:.3f}, {high:.3f}]"
        rows.append([cell.label, len(scores), pooled.tokens, f"{pooled.perplexity:.3f}",
                     vs_none, interval])
    return table(["cell", "documents", "scored tokens", "perplexity", "vs none",
                  "95% CI (paired bootstrap over documents)"], rows)


def plot(results: Results, cells: Sequence[Cell], lengths: Sequence[int], path: Path) -> None:
    """TTFT and TPOT against prompt length per cell, and needle hits per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for cell in cells:
        points = [(n, results.single[(cell.label, n)]) for n in lengths
                  if (cell.label, n) in results.single]
        if len(points) < 2:
            continue
        xs = [t.prompt_tokens for _, t in points]
        axes[0].plot(xs, [t.ttft_s for _, t in points], marker="o", label=cell.label)
        axes[1].plot(xs, [t.tpot_s * 1000 for _, t in points], marker="o", label=cell.label)
    axes[0].set(title="time to first token", xlabel="prompt tokens", ylabel="s")
    axes[1].set(title="time per output token (1 request)", xlabel="prompt tokens", ylabel="ms")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    labels = [c.label for c in cells if c.label in results.needle]
    axes[2].barh(labels, [results.needle[label] for label in labels])
    axes[2].set(title=f"needle hits of {results.needle_cases}", xlabel="hits")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
