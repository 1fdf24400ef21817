"""The leaderboard: per (arm, ratio) the mean score of every (task, length) cell and their
average with 95% intervals, paired comparisons of one arm (the focus, `entropy` unless a run
names another) against the baselines, and the plot of average score against kept ratio.
Written into the `ruler` section of RESULTS.md."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_entropy_kv.bench.sections import table, write_section
from vllm_entropy_kv.eval.results import Row
from vllm_entropy_kv.eval.ruler.arms import REFERENCE
from vllm_entropy_kv.eval.ruler.by_reference import by_place_tables
from vllm_entropy_kv.eval.ruler.sample import CountTokens
from vllm_entropy_kv.eval.ruler.stats import Estimate, average, estimate, mean_of_means
from vllm_entropy_kv.eval.ruler.tasks import TASKS

SECTION = "ruler"
# Cells with fewer samples than the issue asks for are marked, not hidden.
MIN_SAMPLES = 100
FOCUS = "entropy"
MERGING = "entropy-merge"
BASELINES = ("entropy-uniform", "entropy-token", "snapkv", "pyramid", "streaming", "src")
GOAL_RATIO = 0.25
GOAL_FRACTION = 0.9

Row_ = tuple[str, float]  # (arm, ratio)
Column = tuple[str, int]  # (task, length)


def _pct(e: Estimate) -> str:
    mark = "" if e.samples >= MIN_SAMPLES else "*"
    return f"{100 * e.mean:.1f} [{100 * e.low:.0f}, {100 * e.high:.0f}]{mark}"


class Scores:
    """Per-sample scores of the rows, keyed by (arm, ratio) and (task, length)."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.by_cell: dict[Row_, dict[Column, dict[int, float]]] = defaultdict(dict)
        for r in rows:
            cell = self.by_cell[(r["arm"], r["ratio"])]
            cell.setdefault((r["task"], r["length"]), {})[r["index"]] = r["score"]
        self.kept: dict[Row_, list[float]] = defaultdict(list)
        for r in rows:
            self.kept[(r["arm"], r["ratio"])].append(r["kept"])
        self.arms = list(dict.fromkeys(r["arm"] for r in rows))
        self.ratios = sorted({r["ratio"] for r in rows if r["arm"] != REFERENCE})
        order = list(TASKS)
        self.columns = sorted({(r["task"], r["length"]) for r in rows},
                              key=lambda c: (c[1], order.index(c[0])))

    def cells(self) -> list[Row_]:
        """(arm, ratio) rows: the full cache first, then ratio by ratio."""
        out = [(a, r) for (a, r) in self.by_cell if a == REFERENCE]
        return out + [(a, r) for r in self.ratios for a in self.arms if (a, r) in self.by_cell]

    def column(self, cell: Row_, col: Column) -> list[float]:
        return list(self.by_cell[cell].get(col, {}).values())

    def average(self, cell: Row_, columns: Sequence[Column] | None = None) -> Estimate:
        return average([self.column(cell, c) for c in columns or self.columns])

    def mean(self, cell: Row_, columns: Sequence[Column]) -> float:
        """`average(cell, columns).mean` without its bootstrap interval."""
        return mean_of_means([self.column(cell, c) for c in columns])

    def well_sampled(self) -> list[Column]:
        """The columns where every cell that ran them has MIN_SAMPLES samples (all columns if
        none has): the ones comparisons and goals are judged on."""
        counts = {c: [len(self.column(cell, c)) for cell in self.by_cell] for c in self.columns}
        full = [c for c in self.columns if all(n == 0 or n >= MIN_SAMPLES for n in counts[c])]
        return full or self.columns

    def paired(self, a: Row_, b: Row_) -> Estimate:
        """Mean of a - b over the samples both were run on (same prompts), averaged over the
        well-sampled columns, with a stratified bootstrap interval."""
        groups = []
        for col in self.well_sampled():
            sa, sb = self.by_cell[a].get(col, {}), self.by_cell[b].get(col, {})
            groups.append([sa[i] - sb[i] for i in sorted(sa.keys() & sb.keys())])
        return average(groups)


def leaderboard_table(scores: Scores) -> str:
    header = ["policy", "ratio", "held"]
    header += [f"{task} {length / 1024:g}k" for task, length in scores.columns]
    header += ["average [95% CI]", "vs full"]
    has_full = (REFERENCE, 1.0) in scores.by_cell
    lines = []
    for cell in scores.cells():
        avg = scores.average(cell)
        kept = scores.kept[cell]
        # Against the full cache on the columns this row ran (an arm run on fewer tasks).
        ran = [c for c in scores.columns if scores.column(cell, c)]
        full = scores.mean((REFERENCE, 1.0), ran) if has_full else 0.0
        rel = f"{avg.mean / full:.2f}x" if full else "–"
        lines.append(
            [f"**{cell[0]}**" if cell[0] == REFERENCE else cell[0], f"{cell[1]:g}",
             f"{sum(kept) / len(kept):.3f}"]
            + [_pct(estimate(scores.column(cell, c))) if scores.column(cell, c) else "–"
               for c in scores.columns]
            + [_pct(avg), rel]
        )
    return table(header, lines)


def comparisons(scores: Scores, focus: str = FOCUS) -> list[str]:
    """Paired differences focus - baseline per ratio, in points with 95% intervals; `entropy`,
    `entropy-merge` and their tuning variants (`entropy:field=value`) are compared with the
    focus too, so a served setting is paired with its merging counterpart."""
    out = []
    variants = tuple(a for a in scores.arms if a.split(":")[0] in (FOCUS, MERGING))
    others = [a for a in dict.fromkeys(BASELINES + variants) if a != focus]
    for ratio in scores.ratios:
        mine = (focus, ratio)
        if mine not in scores.by_cell:
            continue
        for base in others:
            other = (base, ratio)
            if other not in scores.by_cell:
                continue
            d = scores.paired(mine, other)
            verdict = (f"{focus} ahead" if d.low > 0 else f"{focus} behind" if d.high < 0
                       else "no difference resolved")
            out.append(f"- ratio {ratio:g}: {focus} - {base} = {100 * d.mean:+.1f} points "
                       f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}] over {d.samples} paired "
                       f"samples: {verdict}")
    return out


def goals(scores: Scores) -> list[str]:
    """The issue's goal at 25% kept: the best arm's average >= 90% of the full cache's."""
    if (REFERENCE, 1.0) not in scores.by_cell or GOAL_RATIO not in scores.ratios:
        return []
    columns = scores.well_sampled()
    full = scores.average((REFERENCE, 1.0), columns)
    # Only arms that ran every judged column: an average over fewer tasks is not comparable.
    candidates = [(scores.average((a, GOAL_RATIO), columns), a) for a in scores.arms
                  if (a, GOAL_RATIO) in scores.by_cell and a != REFERENCE
                  and all(scores.column((a, GOAL_RATIO), c) for c in columns)]
    if not candidates:
        return []
    best, name = max(candidates, key=lambda c: c[0].mean)
    share = best.mean / full.mean if full.mean else 0.0
    met = "met" if share >= GOAL_FRACTION else f"NOT met (short by {GOAL_FRACTION - share:.2f})"
    return [f"- Best at {GOAL_RATIO:g} kept on these samples: {name}, {100 * best.mean:.1f} "
            f"vs full {100 * full.mean:.1f} = {share:.2f}x of full; goal >= "
            f"{GOAL_FRACTION:.2f}x: {met}."]


def plot(scores: Scores, path: Path) -> None:
    """Average score against kept ratio, one line per arm, 95% bands, full cache dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5))
    if (REFERENCE, 1.0) in scores.by_cell:
        full = scores.average((REFERENCE, 1.0))
        ax.axhline(100 * full.mean, color="black", linestyle=":", label="full cache")
        ax.axhspan(100 * full.low, 100 * full.high, color="black", alpha=0.06)
    for arm in scores.arms:
        pts = [(r, scores.average((arm, r))) for r in scores.ratios if (arm, r) in scores.by_cell]
        if arm == REFERENCE or not pts:
            continue
        xs = [r for r, _ in pts]
        line, = ax.plot(xs, [100 * e.mean for _, e in pts], marker="o", label=arm,
                        linewidth=2.6 if arm.startswith(FOCUS) else 1.4)
        ax.fill_between(xs, [100 * e.low for _, e in pts], [100 * e.high for _, e in pts],
                        color=line.get_color(), alpha=0.12)
    ax.set_xlabel("kept ratio (kept + summary tokens over the prompt, equal real memory)")
    ax.set_ylabel("suite average score (%)")
    ax.set_title("RULER-style suite: average score vs kept ratio (95% CI bands)")
    ax.set_xticks(scores.ratios)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_name(name: str) -> str:
    """The plot of section `name`, in img/."""
    return f"{name}_vs_ratio.png"


def section(
    scores: Scores, meta: dict[str, Any], name: str = SECTION, by_place: Sequence[str] = ()
) -> str:
    title = "RULER-style suite" if name == SECTION else f"RULER-style suite: {name}"
    out = [f"## {title} (`python -m vllm_entropy_kv.eval.ruler`)", ""]
    for run in meta.get("runs", []):
        out.append("- " + "; ".join(f"**{k}**: {v}" for k, v in run.items()))
    out += [
        "",
        "Scores are RULER's string_match_all in % (the share of the expected values found in "
        "the greedy answer), mean [95% CI] over the samples: Wilson for pass/fail cells, "
        "bootstrap otherwise; the average is the mean over the task columns with a stratified "
        f"bootstrap interval. `*`: fewer than {MIN_SAMPLES} samples in that cell. *held*: kept "
        "+ summary tokens over the prompt (equal real memory).",
        "",
        leaderboard_table(scores),
        "",
    ]
    judged = ", ".join(f"{t} {n / 1024:g}k" for t, n in scores.well_sampled())
    focus = meta.get("focus", FOCUS)
    paired = comparisons(scores, focus)
    if paired:
        out += [f"Paired differences (same prompts) of {focus} against the other arms, and the "
                f"goal, judged on the columns where every cell has {MIN_SAMPLES} samples or "
                f"more ({judged}; all columns if none has):", ""]
        out += paired + [""]
    out += goals(scores)
    if by_place:
        out += [""] + list(by_place)
    if meta.get("notes"):
        out += ["", "Notes:", ""] + [f"- {note}" for note in meta["notes"]]
    out += ["", f"![{name} against kept ratio](img/{plot_name(name)})"]
    return "\n".join(out)


def write_leaderboard(
    out: Path,
    rows: Sequence[Row],
    meta: dict[str, Any],
    name: str = SECTION,
    count: CountTokens | None = None,
) -> str:
    """Section `name` of <out>/RESULTS.md and its plot in <out>/img/; returns the section's
    text. With `count` (the tokenizer's prompt length), tasks that ask for values in order
    also get their hits by place (`by_reference`)."""
    scores = Scores(rows)
    by_place = by_place_tables(rows, count) if count is not None else []
    text = section(scores, meta, name, by_place)
    plot(scores, out / "img" / plot_name(name))
    page = out / "RESULTS.md"
    if not page.exists():
        page.write_text("# Offline evaluation results\n")
    write_section(page, name, text)
    return text
