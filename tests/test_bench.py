"""The serving benchmark's bookkeeping, without a server (its measurements are HTTP calls
to real servers; `python -m vllm_entropy_kv.bench --quick` runs them)."""

from __future__ import annotations

from pathlib import Path

from vllm_entropy_kv.bench.probes import Batch, Cell, Timing
from vllm_entropy_kv.bench.report import Results, batch_table, ratio, single_table, write_section
from vllm_entropy_kv.config import KVPolicyConfig


def test_cells_send_settings_the_server_accepts() -> None:
    server = KVPolicyConfig(policy="entropy")
    for cell in (Cell("none"), Cell("entropy-merge", 0.1), Cell("src", 0.5)):
        config = server.for_request(cell.xargs())
        assert config.policy == cell.policy
    assert Cell("snapkv", 0.25).label == "snapkv@0.25" and Cell("none").label == "none"


def test_tables_report_ratios_to_none() -> None:
    results = Results()
    results.single[("none", 3000)] = Timing(3000, 64, 2.0, 0.040, 4.6)
    results.single[("entropy@0.25", 3000)] = Timing(3000, 64, 2.2, 0.030, 4.1)
    text = single_table(results, [Cell("none"), Cell("entropy", 0.25)], [3000])
    assert "1.10x" in text and "0.75x" in text
    batches = {"none": Batch([Timing(7000, 64, 9.0, 0.2, 22.0)], 4, 3, 22.0, 0.95),
               "entropy@0.25": Batch([Timing(7000, 64, 9.5, 0.1, 16.0)], 14, 0, 16.0, 0.9)}
    text = batch_table(batches, [Cell("none"), Cell("entropy", 0.25)])
    assert "3.50x" in text and "0.50x" in text
    assert ratio(None, 1.0) == ratio(1.0, 0) == "–"


def test_sections_of_the_page_are_replaced_not_duplicated(tmp_path: Path) -> None:
    page = tmp_path / "BENCHMARKS.md"
    write_section(page, "bench", "first")
    write_section(page, "loadtest-compare", "load")
    write_section(page, "bench", "second")
    text = page.read_text()
    assert "second" in text and "first" not in text and text.count("\nload\n") == 1
