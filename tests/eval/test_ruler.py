"""CI's smoke run of the RULER-style suite: 2 samples per task on the embedded model, the
leaderboard well formed, and the full cache finding the single needle."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from vllm_entropy_kv import assets

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        not (assets.is_complete(assets.model_dir()) and assets.is_complete(assets.texts_dir())),
        reason="run `python -m vllm_entropy_kv.assets` first",
    ),
]

TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe",
         "fwe", "qa"]


def test_smoke_leaderboard(tmp_path: Path) -> None:
    from vllm_entropy_kv.eval.ruler.__main__ import main

    rows = main(["--tasks", ",".join(TASKS), "--lengths", "512", "--samples", "2",
                 "--arms", "none,entropy", "--ratios", "0.25", "--out", str(tmp_path)])
    assert len(rows) == len(TASKS) * 2 * 2
    single = [r["score"] for r in rows if r["task"] == "niah_single" and r["arm"] == "none"]
    assert single == [1.0, 1.0]
    assert all(abs(r["kept"] - 0.25) < 0.02 for r in rows if r["arm"] == "entropy")

    text = (tmp_path / "RESULTS.md").read_text()
    section = text[text.index("<!-- ruler:begin -->"): text.index("<!-- ruler:end -->")]
    lines = section.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[first:]))
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:3] == ["policy", "ratio", "held"]
    assert header[3:-2] == [f"{task} 0.5k" for task in TASKS]
    assert header[-2:] == ["average [95% CI]", "vs full"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [(r[0], r[1]) for r in body] == [
        ("**none**", "1"), ("entropy", "0.25")]
    assert all(len(r) == len(header) for r in body)
    assert body[0][3].startswith("100.0 [")
    assert (tmp_path / "img" / "ruler_vs_ratio.png").stat().st_size > 1000
    # niah_multiquery's hits by the place of its asked keys follow the leaderboard.
    assert "niah_multiquery 0.5k, values found by the place of their key" in section
    # Resuming with the same grid runs nothing new.
    again = main(["--tasks", ",".join(TASKS), "--lengths", "512", "--samples", "2",
                  "--arms", "none,entropy", "--ratios", "0.25", "--out", str(tmp_path),
                  "--resume"])
    assert len(again) == len(rows)
    # Another section (a tuning split, say) has its own rows, table and plot on the same page.
    (tmp_path / "img" / "ruler-tuning.json").write_text(
        (tmp_path / "img" / "ruler.json").read_text())
    main(["--replot", "--section", "ruler-tuning", "--out", str(tmp_path)])
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count("<!-- ruler:begin -->") == 1 and "<!-- ruler-tuning:begin -->" in text
    assert "## RULER-style suite: ruler-tuning" in text
    assert (tmp_path / "img" / "ruler-tuning_vs_ratio.png").stat().st_size > 1000


def test_focus_arm_is_compared_with_entropy_and_its_variants() -> None:
    """A tuning round around another arm (the served default, say) pairs it with entropy,
    entropy's variants and entropy-merge's, by name."""
    from vllm_entropy_kv.eval.ruler.leaderboard import Scores, comparisons

    def rows(arm: str, scores: list[float]) -> list[dict]:
        return [{"arm": arm, "ratio": 0.25, "task": "niah_single", "length": 2048, "index": i,
                 "score": s, "kept": 0.25} for i, s in enumerate(scores)]

    scores = Scores(rows("entropy-uniform", [1.0] * 8) + rows("entropy", [0.0] * 8)
                    + rows("entropy:exponent=0:chunk_size=16", [1.0] * 8)
                    + rows("entropy-merge:exponent=0", [0.5] * 8))
    lines = comparisons(scores, "entropy-uniform")
    assert len(lines) == 3
    assert lines[0].startswith("- ratio 0.25: entropy-uniform - entropy = +100.0 points")
    assert lines[0].endswith("entropy-uniform ahead")
    assert "entropy-uniform - entropy:exponent=0:chunk_size=16 = +0.0" in lines[1]
    assert "entropy-uniform - entropy-merge:exponent=0 = +50.0" in lines[2]
    assert comparisons(scores)[0].startswith("- ratio 0.25: entropy - entropy-uniform = -100.0")


def test_an_arm_run_on_fewer_tasks_is_compared_on_those_tasks_only() -> None:
    """An arm run on one of two tasks: its `vs full` uses the full cache on that task, and
    the goal line picks only among arms that ran every task."""
    from vllm_entropy_kv.eval.ruler.leaderboard import Scores, goals, leaderboard_table

    def rows(arm: str, ratio: float, task: str, scores: list[float]) -> list[dict]:
        return [{"arm": arm, "ratio": ratio, "task": task, "length": 2048, "index": i,
                 "score": s, "kept": ratio} for i, s in enumerate(scores)]

    scores = Scores(rows("none", 1.0, "niah_single", [1.0] * 4)
                    + rows("none", 1.0, "niah_multikey", [0.0, 0.0, 0.0, 1.0])
                    + rows("entropy", 0.25, "niah_single", [1.0] * 4)
                    + rows("entropy", 0.25, "niah_multikey", [0.0] * 4)
                    + rows("partial", 0.25, "niah_single", [1.0] * 4))
    table = {line.split("|")[1].strip(): line for line in leaderboard_table(scores).splitlines()}
    assert table["partial"].rstrip(" |").endswith("1.00x")
    assert "partial" not in goals(scores)[0] and "entropy" in goals(scores)[0]
