"""Aggregate result rows into tables and write `RESULTS.md`."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vllm_entropy_kv.bench.sections import marked_sections
from vllm_entropy_kv.eval.perplexity import Scored, perplexity_ratio
from vllm_entropy_kv.eval.results import Row, select

HEADLINE_RATIO = 0.25
ENTROPY_POLICIES = ("entropy", "entropy-merge", "src")
BASELINES = ("streaming", "h2o")
PPL_TOLERANCE = 0.05
NEEDLE_TARGET = 0.9

Cell = tuple[str, float]  # (variant label, keep ratio)


# ---------------------------------------------------------------- aggregation


def variant_order(rows: Sequence[Row]) -> list[str]:
    """Variant labels in the order they were measured (the full-cache reference first)."""
    return list(dict.fromkeys(r["variant"] for r in rows if "variant" in r))


def ratios_of(rows: Sequence[Row]) -> list[float]:
    """The keep ratios measured for compressing policies (the table columns)."""
    return sorted({r["ratio"] for r in rows if "ratio" in r and r.get("policy") != "none"})


def _group(rows: Sequence[Row], key: Callable[[Row], Any]) -> dict[Any, list[Row]]:
    out: dict[Any, list[Row]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return out


def perplexities(rows: Sequence[Row], source: str | None = None) -> dict[Cell, float]:
    """Token-weighted perplexity per (variant, ratio) over the documents (of one source)."""
    chosen = [r for r in select(list(rows), "ppl") if source is None or r["source"] == source]
    return {
        k: math.exp(sum(r["nll"] for r in g) / sum(r["tokens"] for r in g))
        for k, g in _group(chosen, lambda r: (r["variant"], r["ratio"])).items()
    }


def perplexity_interval(rows: Sequence[Row], variant: str, ratio: float) -> str:
    """`variant`'s perplexity at `ratio` relative to the full cache's on the same documents,
    with the 95% interval of a paired bootstrap over documents (`perplexity_ratio`)."""
    chosen = select(list(rows), "ppl")
    full = {r["doc"]: Scored(r["nll"], r["tokens"]) for r in chosen if r["variant"] == "none"}
    mine = [r for r in chosen if r["variant"] == variant and r["ratio"] == ratio
            and r["doc"] in full]
    if not mine:
        return "–"
    mean, low, high = perplexity_ratio([Scored(r["nll"], r["tokens"]) for r in mine],
                                       [full[r["doc"]] for r in mine])
    return f"{mean - 1:+.1%} [{low - 1:+.1%}, {high - 1:+.1%}]"


def kept_fractions(rows: Sequence[Row], task: str) -> dict[Cell, float]:
    """Mean physical fraction of the cache kept (kept + summaries over the full cache)."""
    return {
        k: sum(r["kept"] for r in g) / len(g)
        for k, g in _group(select(list(rows), task), lambda r: (r["variant"], r["ratio"])).items()
    }


def needle_rows(rows: Sequence[Row], mode: str = "agnostic") -> list[Row]:
    """Needle rows of one mode: "agnostic" (question after compression) or "aware"."""
    return [r for r in select(list(rows), "needle") if r.get("mode", "agnostic") == mode]


def hit_rates(rows: Sequence[Row], mode: str = "agnostic") -> dict[Cell, tuple[int, int]]:
    """(hits, cases) per (variant, ratio) for one needle mode."""
    return {
        k: (sum(r["hit"] for r in g), len(g))
        for k, g in _group(needle_rows(rows, mode), lambda r: (r["variant"], r["ratio"])).items()
    }


def reconstruction(rows: Sequence[Row], field: str = "relative") -> dict[Cell, float]:
    """Mean over documents and layers of the per-layer error `field` ("relative" or "mse")."""
    chosen = select(list(rows), "recon")
    return {
        k: sum(sum(r[field]) / len(r[field]) for r in g) / len(g)
        for k, g in _group(chosen, lambda r: (r["variant"], r["ratio"])).items()
    }


def accounting(rows: Sequence[Row]) -> dict[Cell, str]:
    """Memory fractions "FAIR / REAL" per (variant, ratio), averaged over documents."""
    out = {}
    for k, g in _group(select(list(rows), "recon"), lambda r: (r["variant"], r["ratio"])).items():
        out[k] = (
            f"{sum(r['fair'] for r in g) / len(g):.3f} / {sum(r['real'] for r in g) / len(g):.4f}"
        )
    return out


def per_layer_reconstruction(rows: Sequence[Row], ratio: float) -> dict[str, list[float]]:
    """Per variant, the relative error of each layer at `ratio`, averaged over documents."""
    out = {}
    for variant, g in _group(
        select(list(rows), "recon", ratio=ratio), lambda r: r["variant"]
    ).items():
        per_doc = [r["relative"] for r in g]
        out[variant] = [sum(vals) / len(vals) for vals in zip(*per_doc, strict=True)]
    return out


def reference_value(table: dict[Cell, Any], reference: str = "none") -> Any:
    return table.get((reference, 1.0))


# ---------------------------------------------------------------- markdown


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        hits, total = value
        return f"{hits / total:.0%} ({hits}/{total})" if total else "–"
    return format(value, spec)


def matrix(
    table: dict[Cell, Any],
    variants: Sequence[str],
    ratios: Sequence[float],
    spec: str,
    reference: str = "none",
) -> str:
    """A policy x keep-ratio markdown table; the full cache is the first row."""
    lines = [
        "| policy | " + " | ".join(f"keep {r:g}" for r in ratios) + " |",
        "|---|" + "---:|" * len(ratios),
    ]
    ref = reference_value(table, reference)
    if ref is not None:
        lines.append(
            f"| **full cache** (`{reference}`) | "
            + " | ".join(_fmt(ref, spec) for _ in ratios)
            + " |"
        )
    for v in variants:
        if v == reference:
            continue
        cells = [table.get((v, r)) for r in ratios]
        if all(c is None for c in cells):
            continue
        lines.append(f"| {v} | " + " | ".join(_fmt(c, spec) for c in cells) + " |")
    return "\n".join(lines)


def _rel(value: float | None, ref: float | None) -> str:
    if value is None or ref is None:
        return "–"
    return f"{(value / ref - 1):+.1%}"


def headline(rows: Sequence[Row], ratio: float = HEADLINE_RATIO) -> list[str]:
    """The questions the project asks, answered with the numbers (lines of markdown)."""
    ppl, hits, aware = perplexities(rows), hit_rates(rows), hit_rates(rows, "aware")
    recon, kept = reconstruction(rows), kept_fractions(rows, "ppl")
    full_ppl = reference_value(ppl)
    full_hits = reference_value(hits)
    variants = variant_order(rows)
    wanted = [v for v in variants if v.split(" ")[0] in ENTROPY_POLICIES + BASELINES]
    out = [
        f"At keep ratio {ratio:g} (all policies at equal real memory: kept + summary tokens "
        "count alike; the perplexity interval resamples whole documents, paired with the "
        "full cache's):",
        "",
        "| policy | kept | PPL | vs full [95% CI] | needle hits | needle hits, query-aware | "
        "recon. rel. error |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| full cache | 1.000 | {_fmt(full_ppl, '.3f')} | – | {_fmt(full_hits, '')} | "
        f"{_fmt(reference_value(aware), '')} | 0 |",
    ]
    for v in wanted:
        c = (v, ratio)
        out.append(
            f"| {v} | {_fmt(kept.get(c), '.3f')} | {_fmt(ppl.get(c), '.3f')} | "
            f"{perplexity_interval(rows, v, ratio)} | {_fmt(hits.get(c), '')} | "
            f"{_fmt(aware.get(c), '')} | {_fmt(recon.get(c), '.4f')} |"
        )
    out.append("")
    for v in [v for v in variants if v in ENTROPY_POLICIES]:
        out += _verdict(rows, v, ratio, ppl, hits, full_ppl)
    out += ["", "Best of all policies at this ratio: " + "; ".join(_leaders(rows, ratio)) + "."]
    return out


def _leaders(rows: Sequence[Row], ratio: float) -> list[str]:
    """Which variant does best on each measure at `ratio`."""
    out = []
    for what, table, best in (
        ("lowest perplexity", perplexities(rows), min),
        ("lowest reconstruction error", reconstruction(rows), min),
        ("most needle hits", {k: h / n for k, (h, n) in hit_rates(rows).items()}, max),
    ):
        cells = {v: x for (v, r), x in table.items() if r == ratio and v != "none"}
        if cells:
            top = best(cells.values())
            names = ", ".join(v for v, x in cells.items() if x == top)
            out.append(f"{what}: {names} ({top:.4g})")
    return out


def document_wins(rows: Sequence[Row], a: str, b: str, ratio: float) -> tuple[int, int]:
    """On how many documents variant `a` has a lower continuation NLL than `b` at `ratio`."""
    nll = {(r["doc"], r["variant"]): r["nll"] for r in select(list(rows), "ppl", ratio=ratio)}
    docs = sorted({d for d, v in nll if v == a} & {d for d, v in nll if v == b})
    return sum(nll[(d, a)] < nll[(d, b)] for d in docs), len(docs)


def _verdict(
    rows: Sequence[Row],
    v: str,
    ratio: float,
    ppl: dict[Cell, float],
    hits: dict[Cell, tuple[int, int]],
    full_ppl: float | None,
) -> list[str]:
    c = (v, ratio)
    parts = []
    if c in ppl and full_ppl:
        within = ppl[c] <= full_ppl * (1 + PPL_TOLERANCE)
        parts.append(
            f"perplexity {ppl[c]:.3f} vs full {full_ppl:.3f} ({_rel(ppl[c], full_ppl)}): "
            f"{'within' if within else 'NOT within'} {PPL_TOLERANCE:.0%}"
        )
    if c in hits:
        h, n = hits[c]
        parts.append(
            f"needle {h}/{n} = {h / n:.0%}: "
            f"{'meets' if h / n >= NEEDLE_TARGET else 'BELOW'} the {NEEDLE_TARGET:.0%} target"
        )
    for b in BASELINES:
        bc = (b, ratio)
        if c in ppl and bc in ppl:
            wins, docs = document_wins(rows, v, b, ratio)
            parts.append(
                f"PPL {'better' if ppl[c] < ppl[bc] else 'WORSE'} than {b} "
                f"({ppl[c]:.3f} vs {ppl[bc]:.3f}; lower on {wins} of {docs} documents)"
            )
        if c in hits and bc in hits:
            mine, theirs = hits[c][0] / hits[c][1], hits[bc][0] / hits[bc][1]
            word = (
                "better than" if mine > theirs else "equal to" if mine == theirs else "WORSE than"
            )
            parts.append(f"needle {word} {b} ({mine:.0%} vs {theirs:.0%})")
    return [f"- **{v}**: " + "; ".join(parts) + "."] if parts else []


def bias_ablation(rows: Sequence[Row]) -> list[str]:
    """With vs without the log(count) bias, for every policy measured both ways."""
    ppl, hits, recon = perplexities(rows), hit_rates(rows), reconstruction(rows)
    ratios = ratios_of(rows)
    out = []
    for v in variant_order(rows):
        if not v.endswith(" (no bias)"):
            continue
        base = v.removesuffix(" (no bias)")
        out += [
            f"`{base}` with and without the log(count) bias on its summary tokens:",
            "",
            "| keep | PPL with bias | PPL without | documents lower with bias | needle with | "
            "needle without | recon. with | recon. without |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        wins = 0
        for r in ratios:
            a, b = (base, r), (v, r)
            if a in ppl and b in ppl:
                wins += ppl[a] < ppl[b]
            docs_won, docs = document_wins(rows, base, v, r)
            out.append(
                f"| {r:g} | {_fmt(ppl.get(a), '.3f')} | {_fmt(ppl.get(b), '.3f')} | "
                f"{docs_won}/{docs} | {_fmt(hits.get(a), '')} | {_fmt(hits.get(b), '')} | "
                f"{_fmt(recon.get(a), '.4f')} | {_fmt(recon.get(b), '.4f')} |"
            )
        measured = sum((base, r) in ppl and (v, r) in ppl for r in ratios)
        if measured:
            verdict = (
                "the bias helps"
                if wins * 2 > measured
                else "the bias hurts"
                if wins * 2 < measured
                else "no clear winner"
            )
            out += [
                "",
                f"Lower perplexity with the bias at {wins} of {measured} keep ratios: {verdict}.",
                "",
            ]
    return out


def stream_table(rows: Sequence[Row]) -> str:
    chosen = select(list(rows), "stream")
    if not chosen:
        return ""
    lines = [
        "| policy | tokens seen | peak cached (tokens/layer) | final cached | final KV bytes "
        "(bf16) | compressions | stream PPL |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in chosen:
        pts = r["points"]
        lines.append(
            f"| {r['variant']} | {pts[-1][0]:.0f} | {max(p[1] for p in pts):.0f} | "
            f"{pts[-1][1]:.0f} | {pts[-1][2] / 2**20:.1f} MiB | {r['compressions']} | "
            f"{math.exp(r['nll'] / max(1, r['tokens'])):.3f} |"
        )
    return "\n".join(lines)


def write_results(
    path: Path, rows: Sequence[Row], meta: dict[str, Any], images: Sequence[str]
) -> None:
    """Write RESULTS.md: setup, headline, one table per measure, plots."""
    variants, ratios = variant_order(rows), ratios_of(rows)
    img = {Path(p).stem: p for p in images}
    out = [
        "# Offline evaluation results",
        "",
        "Generated by `python -m vllm_entropy_kv.eval` (HF transformers on CPU, no vLLM). "
        "Re-running the command below rewrites this file and the plots.",
        "",
        "## Setup",
        "",
    ]
    out += [f"- **{k}**: {v}" for k, v in meta.items() if k not in ("settings", "notes")]
    out += ["- **settings**:"] + [f"  - {k}: {v}" for k, v in meta.get("settings", {}).items()]
    out += [
        "",
        "Every policy gets the same memory: `Budget(keep=ratio)` tokens per layer on "
        "average, and summary tokens (merged or synthetic) count like kept ones. The harness "
        "re-plans with a smaller budget any policy whose kept + summary tokens would exceed "
        "that (budget matching `real`); the *fraction actually held* table shows the result. "
        "Bytes follow tokens: every token, real or synthetic, is one K/V slot. The `none` "
        "row is the full cache.",
        "",
    ]
    if select(list(rows), "ppl") or select(list(rows), "needle"):
        out += ["## Headline", ""] + headline(rows) + [""]
    ablation = bias_ablation(rows)
    if ablation:
        out += ["## log(count) bias on summary tokens (Attention Matching)", ""] + ablation
    if select(list(rows), "ppl"):
        out += [
            "## 1. Perplexity of a held-back continuation",
            "",
            "Context compressed once at the end of its prefill, continuation scored over the "
            "compressed cache (token-weighted over documents; lower is better).",
            "",
        ]
        for source, title in (
            (None, "All documents"),
            ("gutenberg", "Gutenberg plays"),
            ("britannica", "Britannica 1911 (PG-19 stand-in)"),
        ):
            table = perplexities(rows, source)
            if table:
                out += [f"**{title}**", "", matrix(table, variants, ratios, ".3f"), ""]
        out += [
            "**Fraction of the cache actually held** (kept + summaries)",
            "",
            matrix(kept_fractions(rows, "ppl"), variants, ratios, ".3f"),
            "",
        ]
        out += _image(img, "ppl_vs_ratio")
    if needle_rows(rows):
        out += [
            "## 2. Needle in a haystack (Paul Graham essays)",
            "",
            "Haystack compressed query-agnostically, question appended uncompressed, greedy "
            "answer; a hit is the key phrase in the answer.",
            "",
            matrix(hit_rates(rows), variants, ratios, ""),
            "",
        ]
        out += _image(img, "needle_vs_ratio")
    if needle_rows(rows, "aware"):
        out += [
            "**Query-aware variant**: the question and the end of the user turn are part of "
            "the compressed prompt (so the observation window holds the question); only the "
            "assistant header is appended. Fewer cases and policies (see the command).",
            "",
            matrix(hit_rates(rows, "aware"), variants, ratios, ""),
            "",
        ]
    if select(list(rows), "recon"):
        out += [
            "## 3. Attention-output reconstruction error",
            "",
            "Held-out queries (the first continuation tokens, computed with the full cache) "
            "attend to the full and to the compressed prompt cache; error = MSE of the two "
            "attention outputs relative to the mean square of the full output, averaged over "
            "layers and documents (lower is better).",
            "",
            matrix(reconstruction(rows), variants, ratios, ".4f"),
            "",
            "Absolute MSE:",
            "",
            matrix(reconstruction(rows, "mse"), variants, ratios, ".3e"),
            "",
            "Memory held, **FAIR / REAL** as the SRC article accounts it (`policies.src`): "
            "FAIR = effective tokens (kept + synthetic) over the full cache, REAL = bytes "
            "(bf16 K/V + one 4-byte log-count per summary) over the full cache's bytes. "
            "Policies that merge or summarise count their summaries against the budget, "
            "so at equal keep ratio every row holds the same FAIR budget.",
            "",
            matrix(accounting(rows), variants, ratios, ""),
            "",
        ]
        out += _image(img, "recon_vs_ratio") + _image(img, "recon_per_layer")
    if select(list(rows), "stream"):
        out += [
            "## 4. Memory over a long stream",
            "",
            "A long text fed in chunks; when the mean cached tokens per layer exceed the "
            "budget, the policy compresses the whole cache (earlier summaries included) down "
            "to a smaller size: the step pattern.",
            "",
            stream_table(rows),
            "",
        ]
        out += _image(img, "memory_over_time")
    if select(list(rows), "profile"):
        out += ["## Entropy profile and per-layer budgets", ""]
        out += _image(img, "entropy_heatmap") + _image(img, "layer_budgets")
    if meta.get("notes"):
        out += ["## Notes on this run", ""] + [f"- {note}" for note in meta["notes"]] + [""]
    out += ["## Caveats", ""] + caveats(rows)
    # Sections other commands write into this page (the RULER leaderboard) stay.
    out += ["", marked_sections(path)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out).rstrip() + "\n")


def caveats(rows: Sequence[Row]) -> list[str]:
    """What the numbers can and cannot say, with this run's sample sizes."""
    docs = sorted({r["doc"] for r in select(list(rows), "ppl")})
    needles = {(r["target_length"], r["depth"]) for r in needle_rows(rows)}
    return [
        f"- One small model (SmolLM2-135M) and small samples: {len(docs)} perplexity "
        f"document(s), {len(needles)} needle case(s) per cell. A needle cell moves in steps of "
        f"{1 / max(1, len(needles)):.0%}; perplexity differences of a few tenths between "
        "policies are within the spread between documents (compare the per-source tables).",
        "- The needle test is query-agnostic, as kvpress measures it: the haystack is compressed "
        "before the question exists, so the observation window (the end of the haystack) says "
        "nothing about the needle. Query-aware use (question inside the window) is easier.",
        "- Every policy keeps the first 4 (sink) and last 32 (recent) prompt tokens "
        "(`Budget` defaults) and uses block size 1; vLLM's block rounding is not applied here.",
        "- Perplexity of the text that directly follows the context rewards keeping recent "
        "tokens (the last lines predict the next words best), which favours StreamingLLM; the "
        "reconstruction error weighs whatever the next queries attend to, wherever it is.",
        "- Reconstruction error uses the true next-token queries of the full-cache model, one "
        "layer at a time (errors do not compound); perplexity and the needle include the "
        "compounding through the layers.",
        "",
    ]


def _image(images: dict[str, str], stem: str) -> list[str]:
    return [f"![{stem}]({images[stem]})", ""] if stem in images else []
