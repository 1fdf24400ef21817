"""The serving benchmark's bookkeeping, without a server (its measurements are HTTP calls
to real servers; `python -m vllm_entropy_kv.bench --quick` runs them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_entropy_kv.bench.probes import Batch, Cell, Timing
from vllm_entropy_kv.bench.report import (
    Results,
    batch_table,
    perplexity_table,
    ratio,
    single_table,
)
from vllm_entropy_kv.bench.sections import write_section
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


def test_policies_flag_takes_per_request_settings() -> None:
    from vllm_entropy_kv.bench.__main__ import parse_args

    args = parse_args(["--policies", "entropy:kv_recent_tokens=128,snapkv"])
    assert args.policies == [("entropy", (("kv_recent_tokens", 128),)), ("snapkv", ())]
    cell = Cell("entropy", 0.25, args.policies[0][1])
    assert KVPolicyConfig(policy="entropy").for_request(cell.xargs()).recent_tokens == 128
    with pytest.raises(SystemExit):
        parse_args(["--policies", "entropy:recent=128"])  # not a kv_ field


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
    results.perplexity = {
        "none": [Scored(nll=200.0, tokens=100), Scored(nll=100.0, tokens=50)],
        "entropy@0.25": [Scored(nll=210.0, tokens=100), Scored(nll=100.0, tokens=50)]}
    text = perplexity_table(results, [Cell("none"), Cell("entropy", 0.25)])
    # Pooled: exp(300/150) and exp(310/150); the ratio exp(10/150), its interval between the
    # resamples' extremes, both windows' ratios (1.105 and 1.000).
    assert "7.389" in text and "7.898" in text and "1.069x" in text
    assert "[1.000, 1.105]" in text
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


DATA = Path(__file__).resolve().parent / "data"


def test_vllm_bench_stage_runs_the_issues_workloads_against_the_same_pool() -> None:
    from vllm_entropy_kv.bench.__main__ import parse_args
    from vllm_entropy_kv.bench.vllm_client import Comparison, client_command, sides, workloads

    random, pressure = workloads(parse_args(["--stages", "vllm-bench"]))
    assert [w.name for w in workloads(parse_args(["--vllm-bench-workloads", "pressure"]))] == [
        "pressure"]
    assert random.client_args() == [
        "--dataset-name", "random", "--random-input-len", "2000", "--random-output-len", "64",
        "--num-prompts", "16", "--max-concurrency", "8"]
    assert (pressure.num_prompts, pressure.max_concurrency, pressure.pool_requests) == (32, 32, 8)
    command = client_command("http://h:1", random, Path("/r/x.json"), 1)
    assert command[1:3] == ["bench", "serve"] and "--save-result" in command
    assert command[command.index("--seed") + 1] == "7"
    # Same bytes and model length: 128-token blocks of all layers against 32-token blocks
    # of one layer each (30 layers).
    stock, entropy = (side.serve_flags(pressure.kv_tokens) for side in sides(0.25))
    assert stock[stock.index("--block-size") + 1] == "128"
    blocks = [int(f[f.index("--num-gpu-blocks-override") + 1]) for f in (stock, entropy)]
    assert blocks[0] * 128 * 30 == blocks[1] * 32 == pressure.kv_tokens * 30
    assert stock[stock.index("--max-model-len") + 1] == entropy[entropy.index(
        "--max-model-len") + 1]
    assert entropy[-2:] == ["--kv-budget", "0.25"] and "--kv-budget" not in stock
    assert stock[stock.index("--max-model-len") + 1] == "4096"
    assert stock.count("--max-model-len") == entropy.count("--max-model-len") == 1
    # --vllm-bench-entropy-flags: more flags for the entropy server alone, named in its label.
    comparison = Comparison(entropy_flags=("--kv-sink-tokens", "2000"))
    stock_side, entropy_side = comparison.sides(0.25)
    assert entropy_side.serve_flags(pressure.kv_tokens)[-4:] == [
        "--kv-budget", "0.25", "--kv-sink-tokens", "2000"]
    assert entropy_side.label == "entropy@0.25 --kv-sink-tokens 2000"
    assert stock_side.serve_flags(pressure.kv_tokens) == stock


def test_vllm_bench_table_reads_the_clients_saved_results() -> None:
    """Results saved by a real `vllm bench serve` (4 random 500-token prompts, 64 output
    tokens, --max-concurrency 4) against a stock and an entropy@0.25 server."""
    from vllm_entropy_kv.bench.vllm_client import ClientRun, Comparison, Workload, \
        comparison_table, rounds_table

    def run(name: str, peak_kv_usage: float, prefix_hit_rate: float = 0.0) -> ClientRun:
        return ClientRun(json.loads((DATA / name).read_text()), {
            "peak_running": 4, "preemptions": 0, "prefix_hit_rate": prefix_hit_rate,
            "peak_kv_usage": peak_kv_usage, "idle_kv_usage": 0.0})

    comparison = Comparison()
    comparison.add("stock", "random", run("vllm-bench-stock.json", 0.8))
    comparison.add("entropy@0.25", "random", run("vllm-bench-entropy.json", 0.2))
    workloads = [Workload("random", 500, 64, 4, 4, 2560)]
    text = comparison_table(comparison, workloads, 0.25)
    stock_row, entropy_row = text.splitlines()[2:]
    assert stock_row.startswith("| stock | random | 4/4 | 42.64 (1.00x) | 2.22 (1.00x) |")
    # output tok/s 43.65/42.64, mean TTFT 2.65/2.22 s, mean TPOT 50.8/59.9 ms
    assert "43.65 (1.02x)" in entropy_row and "2.65 (1.20x)" in entropy_row
    assert "50.8 (0.85x)" in entropy_row and "| 4 (1.00x) | 0 (–) |" in entropy_row
    assert entropy_row.endswith("| 0.00 (–) | 0.20 (0.25x) | 0.00 (–) |")

    # A second round: cells are medians over the rounds, each round's ratio is listed.
    comparison.add("stock", "random", run("vllm-bench-entropy.json", 0.8))
    comparison.add("entropy@0.25", "random", run("vllm-bench-stock.json", 0.2))
    stock_row, entropy_row = comparison_table(comparison, workloads, 0.25).splitlines()[2:]
    assert stock_row.startswith("| stock | random | 8/8 | 43.14 (1.00x) | 2.43 (1.00x) |")
    rounds = rounds_table(comparison, workloads, 0.25)
    ttft = next(line for line in rounds.splitlines() if "| mean TTFT s |" in line)
    assert "| 1.20, 0.84 | 1.00x [" in ttft  # 2.65/2.22 and back: a geometric mean of 1

    # A round where entropy found no prefix hit that stock found: its ratio is 0, listed,
    # and no geometric mean is made of it (log 0).
    comparison.add("stock", "random", run("vllm-bench-stock.json", 0.8, prefix_hit_rate=0.06))
    comparison.add("entropy@0.25", "random", run("vllm-bench-entropy.json", 0.2))
    rounds = rounds_table(comparison, workloads, 0.25)
    hits = next(line for line in rounds.splitlines() if "| prefix hit rate |" in line)
    assert hits.endswith("| 0.00 | – (a ratio of 0) |"), hits


def test_geometric_mean_interval_of_paired_ratios() -> None:
    from vllm_entropy_kv.bench.report import geometric_mean_interval

    assert geometric_mean_interval([1.2]) == pytest.approx((1.2, 1.2, 1.2))
    mean, low, high = geometric_mean_interval([1.1, 1.2, 1.3])
    # log-ratios 0.0953, 0.1823, 0.2624: mean 0.1800, sd 0.0836, t(2) 4.303
    assert mean == pytest.approx(1.1972, abs=1e-3)
    assert (low, high) == pytest.approx((0.9728, 1.4734), abs=1e-3)


def test_the_prefix_workload_drives_vllms_prefix_repetition_dataset() -> None:
    from vllm_entropy_kv.bench.vllm_client import Workload

    prefix = Workload("prefix", 200, 64, 32, 8, 25000, prefix_len=2000, num_prefixes=4)
    args = prefix.client_args()
    assert args[args.index("--dataset-name") + 1] == "prefix_repetition"
    assert args[args.index("--prefix-repetition-prefix-len") + 1] == "2000"
    assert args[args.index("--prefix-repetition-suffix-len") + 1] == "200"
    assert prefix.pool_requests == 25000 / 2304  # 2,264 tokens in 128-token blocks


def test_stock_server_log_must_show_vllms_scheduling_defaults() -> None:
    from vllm_entropy_kv.bench.vllm_client import adjustments, scheduling_problems

    stock = "... enable_prefix_caching=True, enable_chunked_prefill=True, pooler_config=None"
    assert scheduling_problems(stock, stock=True) == []
    changed = stock + ("\nvllm-entropy-kv: block_size unset (vLLM's default) -> 32: a layer "
                       "frees whole blocks")
    assert scheduling_problems(changed, stock=False) == []
    assert adjustments(changed) == ["block_size unset (vLLM's default) -> 32"]
    assert len(scheduling_problems(changed, stock=True)) == 1
    off = "non-default args: {'async_scheduling': False}\nenable_chunked_prefill=False"
    assert len(scheduling_problems(off, stock=False)) == 2


def test_header_names_the_dtype_of_a_server_given_by_url() -> None:
    from vllm_entropy_kv.bench.__main__ import parse_args, report_header

    args = parse_args(["--url", "http://127.0.0.1:1", "--url-dtype", "float32"])
    assert "(float32, vLLM 0.32.0 CPU" in report_header(args, "cmd", "now")
    with pytest.raises(SystemExit):
        parse_args(["--url-dtype", "float32"])  # no --url: nothing to describe
    assert parse_args([]).perplexity_concurrency == 8
