"""PNG plots of the result rows (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vllm_entropy_kv.eval import report  # noqa: E402
from vllm_entropy_kv.eval.results import Row, select  # noqa: E402

MARKERS = "osD^vP*Xh<>p"
DPI = 110


def _style(variants: Sequence[str]) -> dict[str, dict]:
    """One colour and marker per policy (a no-bias variant shares its policy's colour, dashed);
    entropy policies drawn thicker."""
    cmap = plt.get_cmap("tab10")
    bases = list(dict.fromkeys(v.split(" ")[0] for v in variants))
    out = {}
    for v in variants:
        base = v.split(" ")[0]
        i = bases.index(base)
        out[v] = {
            "color": cmap(i % 10),
            "marker": MARKERS[i % len(MARKERS)],
            "linewidth": 2.6 if base in report.ENTROPY_POLICIES else 1.4,
            "linestyle": "--" if v.endswith("(no bias)") else "-",
        }
    return out


def _save(fig: plt.Figure, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def _vs_ratio(
    table: dict,
    rows: Sequence[Row],
    ylabel: str,
    title: str,
    path: Path,
    log: bool = False,
    percent: bool = False,
    unit_range: bool = False,
    target: tuple[float, str] | None = None,
) -> str:
    variants, ratios = report.variant_order(rows), report.ratios_of(rows)
    style = _style(variants)
    fig, ax = plt.subplots(figsize=(8.5, 5))
    ref = report.reference_value(table)
    if ref is not None and not (log and ref <= 0):
        ax.axhline(ref, color="black", linestyle=":", linewidth=1.5, label="full cache")
    if target is not None:
        ax.axhline(target[0], color="grey", linestyle="--", linewidth=1, label=target[1])
    for v in variants:
        pts = [(r, table[(v, r)]) for r in ratios if (v, r) in table]
        if v == "none" or not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=v, **style[v])
    ax.set_xlabel("keep ratio (fraction of the KV cache held, equal real memory)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(ratios)
    if log:
        ax.set_yscale("log")
    if percent:
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    if unit_range:
        ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    return _save(fig, path)


def ppl_vs_ratio(rows: Sequence[Row], path: Path) -> str:
    """Perplexity as the increase over the full cache (0 = as good as no compression)."""
    ppl = report.perplexities(rows)
    full = report.reference_value(ppl)
    table = {k: v / full - 1 for k, v in ppl.items()} if full else ppl
    return _vs_ratio(
        table,
        rows,
        f"perplexity increase over the full cache ({full:.2f})" if full else "perplexity",
        "Continuation perplexity after a compressed context (lower is better)",
        path,
        percent=bool(full),
        target=(report.PPL_TOLERANCE, f"{report.PPL_TOLERANCE:.0%} target") if full else None,
    )


def needle_vs_ratio(rows: Sequence[Row], path: Path) -> str:
    table = {k: h / n for k, (h, n) in report.hit_rates(rows).items()}
    return _vs_ratio(
        table,
        rows,
        "needle hit rate",
        "Needle in a haystack (query-agnostic compression)",
        path,
        percent=True,
        unit_range=True,
        target=(report.NEEDLE_TARGET, f"{report.NEEDLE_TARGET:.0%} target"),
    )


def recon_vs_ratio(rows: Sequence[Row], path: Path) -> str:
    return _vs_ratio(
        report.reconstruction(rows),
        rows,
        "attention-output relative MSE (log)",
        "Attention-output reconstruction error, mean over layers",
        path,
        log=True,
    )


def recon_per_layer(rows: Sequence[Row], path: Path, ratio: float = report.HEADLINE_RATIO) -> str:
    table = report.per_layer_reconstruction(rows, ratio)
    style = _style(report.variant_order(rows))
    fig, ax = plt.subplots(figsize=(9, 5))
    shown = report.ENTROPY_POLICIES + report.BASELINES
    for v, errs in table.items():
        if v.split(" ")[0] not in shown:
            continue
        ax.plot(range(len(errs)), errs, label=v, **{**style[v], "markersize": 4})
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("attention-output relative MSE (log)")
    ax.set_title(f"Reconstruction error per layer at keep {ratio:g}")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    return _save(fig, path)


def memory_over_time(rows: Sequence[Row], path: Path) -> str:
    chosen = select(list(rows), "stream")
    style = _style([r["variant"] for r in chosen])
    fig, ax = plt.subplots(figsize=(9, 5))
    # Policies with the same budget draw the same steps: wider lines first keep them visible.
    widths = [1.5 + 1.2 * (len(chosen) - 1 - i) for i in range(len(chosen))]
    for r, width in zip(chosen, widths, strict=True):
        seen = [p[0] for p in r["points"]]
        mib = [p[2] / 2**20 for p in r["points"]]
        st = {**style[r["variant"]], "marker": None, "linewidth": width, "linestyle": "-"}
        if r["variant"] == "none":
            st.update(color="black", linestyle=":", linewidth=1.5)
        ax.plot(seen, mib, label=r["variant"], **st)
    if chosen:
        first = chosen[0]
        bytes_per_token = first["points"][-1][2] / max(1.0, first["points"][-1][1])
        ax.axhline(
            first["budget_tokens"] * bytes_per_token / 2**20,
            color="grey",
            linewidth=0.8,
            linestyle="--",
            label=f"budget ({first['budget_tokens']} tokens/layer)",
        )
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("KV cache (MiB, bf16, all layers)")
    ax.set_title(
        "KV cache size over a long stream (compress when over budget)\n"
        "overlapping lines: policies holding the same memory"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    return _save(fig, path)


def entropy_heatmap(rows: Sequence[Row], path: Path) -> str:
    prof = select(list(rows), "profile")[0]
    ent = prof["head_entropy"]
    fig, (ax, side) = plt.subplots(1, 2, figsize=(9, 7), width_ratios=[3, 1], sharey=True)
    im = ax.imshow(ent, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(len(ent[0])))
    ax.set_title("Normalised attention entropy per head")
    fig.colorbar(im, ax=ax, label="H / log(visible keys)", location="left", pad=0.12)
    means = [sum(h) / len(h) for h in ent]
    side.barh(range(len(means)), means, color="tab:blue")
    side.set_xlim(0, 1)
    side.set_xlabel("layer mean")
    side.grid(alpha=0.3, axis="x")
    fig.suptitle(f"{prof['doc']} ({prof['context']} tokens, last 32 prompt queries)")
    return _save(fig, path)


def layer_budgets(rows: Sequence[Row], path: Path) -> str:
    prof = select(list(rows), "profile")[0]
    fig, ax = plt.subplots(figsize=(9, 5))
    layers = range(len(prof["head_entropy"]))
    for i, (name, budget) in enumerate(prof["budgets"].items()):
        ax.plot(layers, budget, marker=MARKERS[i], label=name, linewidth=2)
    ax.axhline(prof["uniform"], color="black", linestyle=":", label="uniform")
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens held (kept + summaries)")
    ax.set_title(f"Per-layer budgets at keep {prof['ratio']:g} of {prof['context']} tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def all_plots(rows: Sequence[Row], img_dir: Path) -> list[str]:
    """Every plot the rows allow; returns the written paths."""
    tasks = {r["task"] for r in rows}
    plots = []
    if "ppl" in tasks:
        plots.append(ppl_vs_ratio(rows, img_dir / "ppl_vs_ratio.png"))
    if "needle" in tasks:
        plots.append(needle_vs_ratio(rows, img_dir / "needle_vs_ratio.png"))
    if "recon" in tasks:
        plots.append(recon_vs_ratio(rows, img_dir / "recon_vs_ratio.png"))
        plots.append(recon_per_layer(rows, img_dir / "recon_per_layer.png"))
    if "stream" in tasks:
        plots.append(memory_over_time(rows, img_dir / "memory_over_time.png"))
    if "profile" in tasks:
        plots.append(entropy_heatmap(rows, img_dir / "entropy_heatmap.png"))
        plots.append(layer_budgets(rows, img_dir / "layer_budgets.png"))
    return plots
