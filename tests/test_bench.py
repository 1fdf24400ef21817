"""The serving benchmark's bookkeeping, without a server (its measurements are HTTP calls
to real servers; `python -m vllm_entropy_kv.bench --quick` runs them)."""

from __future__ import annotations

from pathlib import Path

from vllm_entropy_kv.bench.probes import Batch, Cell, Timing
from vllm_entropy_kv.bench.report import (
    Results,
    batch_table,
    perplexity_table,
    ratio,
    single_table,
    write_section,
)
from vllm_entropy_kv.config import KVPolicyConfig
from vllm_entropy_kv.eval.perplexity import Scored


def test_cells_send_settings_the_server_accepts() -> None:
    server = KVPolicyConfig(policy="entropy")
    for cell in (Cell("none"), Cell("entropy-merge", 0.1), Cell("src", 0.5)):
        config = server.for_request(cell.xargs())
        assert config.policy == cell.policy
    assert Cell("snapkv", 0.25).label == "snapkv@0.25" and Cell("none").label == "none"
    unbiased = Cell("src", 0.25, (("kv_merge_bias", False),))
    assert not server.for_request(unbiased.xargs()).merge_bias
    assert unbiased.label == "src@0.25 kv_merge_bias=false"


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
    results.perplexity = {"none": Scored(nll=200.0, tokens=100), "entropy@0.25": Scored(
        nll=210.0, tokens=100)}
    text = perplexity_table(results, [Cell("none"), Cell("entropy", 0.25)])
    assert "7.389" in text and "8.166" in text and "1.11x" in text
    assert ratio(None, 1.0) == ratio(1.0, 0) == "–"


def test_decode_time_per_token_is_read_while_every_request_decodes() -> None:
    def streamed(*times: float) -> Timing:
        return Timing(7000, len(times), times[0], 0.0, times[-1], token_times=times)

    # Both decode from t=4 (b's first token) to t=10 (a's last): a's gaps there are 1 s,
    # b's 2 s; a's tokens before t=4 came between prefills and are left out.
    a, b = streamed(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10), streamed(4, 6, 8, 10, 12)
    assert Batch([a, b], 2, 0, 12.0, 0.5).all_decoding_tpot_s == 1.5
    # One finished before the other started: they never decoded together.
    early, late = streamed(0, 1, 2), streamed(5, 6, 7)
    assert Batch([early, late], 1, 0, 7.0, 0.5).all_decoding_tpot_s is None


def test_sections_of_the_page_are_replaced_not_duplicated(tmp_path: Path) -> None:
    page = tmp_path / "BENCHMARKS.md"
    write_section(page, "bench", "first")
    write_section(page, "loadtest-compare", "load")
    write_section(page, "bench", "second")
    text = page.read_text()
    assert "second" in text and "first" not in text and text.count("\nload\n") == 1
