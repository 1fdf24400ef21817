"""`--stages vllm-bench`: stock vLLM against `--kv-policy entropy` through vLLM's own client.

For each workload two servers are started one after the other with the same KV memory, the
same dtype and the same `--max-model-len`: *stock*, `--kv-policy none` (the plugin changes
nothing: vLLM's chunked prefill, async scheduling (which vLLM's CPU platform turns off),
step budget and block size stay as vLLM sets them), and *entropy@B*, `--kv-policy entropy
--kv-budget B`. `vllm bench serve` (random prompts, `--save-result`) drives each;
`vllm:num_requests_running` is sampled from /metrics while it runs for the peak, and
`vllm:num_preemptions_total` is read before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vllm_entropy_kv import assets
from vllm_entropy_kv.bench import report
from vllm_entropy_kv.bench.probes import KV_USAGE, PeakSampler
from vllm_entropy_kv.launch import (
    VllmServer,
    free_port,
    metric,
    pool_flags,
    vllm_executable,
    wait_for_idle_cache,
)

# vLLM 0.32's CPU block size when none is given (vllm/platforms/cpu.py); the stock server
# gets it explicitly only so that its pool can be sized in blocks of the same bytes.
STOCK_BLOCK_SIZE = 128
SEED = 7


@dataclass(frozen=True)
class Workload:
    """One `vllm bench serve` workload and the KV pool (tokens of full KV) it runs in: random
    prompts of `input_len` tokens, or, with `prefix_len`, vLLM's `prefix_repetition` dataset
    (`num_prefixes` shared prefixes, each prompt one of them and a random `input_len`-token
    suffix)."""

    name: str
    input_len: int
    output_len: int
    num_prompts: int
    max_concurrency: int
    kv_tokens: int
    prefix_len: int = 0
    num_prefixes: int = 0

    def dataset_args(self) -> list[str]:
        if self.prefix_len:
            return ["--dataset-name", "prefix_repetition",
                    "--prefix-repetition-prefix-len", str(self.prefix_len),
                    "--prefix-repetition-suffix-len", str(self.input_len),
                    "--prefix-repetition-num-prefixes", str(self.num_prefixes),
                    "--prefix-repetition-output-len", str(self.output_len)]
        return ["--dataset-name", "random", "--random-input-len", str(self.input_len),
                "--random-output-len", str(self.output_len)]

    def client_args(self) -> list[str]:
        return [*self.dataset_args(), "--num-prompts", str(self.num_prompts),
                "--max-concurrency", str(self.max_concurrency)]

    @property
    def pool_requests(self) -> float:
        """Requests of this workload the pool holds uncompressed, in stock's blocks."""
        return self.kv_tokens / request_tokens(self.prefix_len + self.input_len,
                                               self.output_len)


def request_tokens(input_len: int, output_len: int) -> int:
    """KV tokens one request holds at its end, uncompressed, in stock's whole blocks."""
    return -(-(input_len + output_len) // STOCK_BLOCK_SIZE) * STOCK_BLOCK_SIZE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "vllm-bench stage", "stock vLLM against entropy through `vllm bench serve`; pools are "
        "whole multiples of a request's uncompressed KV, in stock's 128-token blocks (the same "
        "bytes as entropy's 32-token blocks)")
    group.add_argument("--vllm-bench-budget", type=float, default=0.25)
    group.add_argument("--vllm-bench-input-len", type=int, default=2000)
    group.add_argument("--vllm-bench-output-len", type=int, default=64)
    group.add_argument("--vllm-bench-prompts", type=int, default=16)
    group.add_argument("--vllm-bench-concurrency", type=int, default=8)
    group.add_argument("--vllm-bench-pool-requests", type=int, default=11,
                       help="the unpressured pool holds this many requests uncompressed")
    group.add_argument("--vllm-bench-pressure-prompts", type=int, default=32)
    group.add_argument("--vllm-bench-pressure-concurrency", type=int, default=32)
    group.add_argument("--vllm-bench-pressure-pool-requests", type=int, default=8,
                       help="the memory-pressure pool holds this many requests uncompressed")
    group.add_argument("--vllm-bench-workloads", default="random,pressure",
                       help="comma-separated, of random, pressure")
    group.add_argument("--vllm-bench-warmups", type=int, default=1,
                       help="`vllm bench serve --num-warmups`: one-time costs (first "
                       "kernels, imports) stay out of the measured run")
    group.add_argument("--vllm-bench-entropy-flags", default="",
                       help="more flags of the entropy server, e.g. \"--kv-sink-tokens "
                       "2000\" (a shared prefix kept whole: its blocks stay shared)")
    group.add_argument("--vllm-bench-rounds", type=int, default=3,
                       help="rounds of both servers, alternating, each on fresh servers: "
                       "cells are medians, ratios get a 95%% interval over the rounds")
    prefix = parser.add_argument_group(
        "prefix-cache stage", "the same two servers, prefix caching on in both (vLLM's "
        "default), on vLLM's prefix_repetition dataset in the unpressured pool's memory; "
        "output length, concurrency, budget, warm-ups and rounds are the vllm-bench "
        "stage's")
    prefix.add_argument("--prefix-cache-prefix-len", type=int, default=2000)
    prefix.add_argument("--prefix-cache-suffix-len", type=int, default=200)
    prefix.add_argument("--prefix-cache-prefixes", type=int, default=4)
    prefix.add_argument("--prefix-cache-prompts", type=int, default=32)


def workloads(args: argparse.Namespace) -> list[Workload]:
    per_request = request_tokens(args.vllm_bench_input_len, args.vllm_bench_output_len)
    chosen = args.vllm_bench_workloads.split(",")
    return [w for w in [
        Workload("random", args.vllm_bench_input_len, args.vllm_bench_output_len,
                 args.vllm_bench_prompts, args.vllm_bench_concurrency,
                 per_request * args.vllm_bench_pool_requests),
        Workload("pressure", args.vllm_bench_input_len, args.vllm_bench_output_len,
                 args.vllm_bench_pressure_prompts, args.vllm_bench_pressure_concurrency,
                 per_request * args.vllm_bench_pressure_pool_requests),
    ] if w.name in chosen]


def prefix_workload(args: argparse.Namespace) -> Workload:
    per_request = request_tokens(args.prefix_cache_prefix_len + args.prefix_cache_suffix_len,
                                 args.vllm_bench_output_len)
    return Workload("prefix", args.prefix_cache_suffix_len, args.vllm_bench_output_len,
                    args.prefix_cache_prompts, args.vllm_bench_concurrency,
                    per_request * args.vllm_bench_pool_requests,
                    prefix_len=args.prefix_cache_prefix_len,
                    num_prefixes=args.prefix_cache_prefixes)


@dataclass(frozen=True)
class Side:
    """One server of the comparison."""

    label: str
    policy: str
    extra_args: tuple[str, ...] = ()

    def serve_flags(self, kv_tokens: int) -> list[str]:
        block_size = STOCK_BLOCK_SIZE if self.policy == "none" else None
        # vLLM wants one block more than a request of the model's length in a pool of
        # 128-token blocks: a small pool gets a model length one stock block shorter.
        max_model_len = min(4096, kv_tokens - STOCK_BLOCK_SIZE)
        return [*pool_flags(self.policy, kv_tokens, block_size, max_model_len),
                *self.extra_args]


def sides(budget: float, entropy_flags: Sequence[str] = ()) -> tuple[Side, Side]:
    """Stock vLLM and entropy at `budget`, with `entropy_flags` (more `--kv-*` flags) added
    to the entropy server and its label."""
    label = " ".join([f"entropy@{budget:g}", *entropy_flags])
    return Side("stock", "none"), Side(label, "entropy",
                                       ("--kv-budget", f"{budget:g}", *entropy_flags))


@dataclass(frozen=True)
class ClientRun:
    """What `vllm bench serve` saved, with what /metrics showed while it ran: the result's
    keys, and `peak_running`, `preemptions`, `prefix_hit_rate` (vLLM's prefix-cache hits /
    queries over the run), `peak_kv_usage`, `idle_kv_usage` (after the run) as keys too."""

    result: dict
    probes: dict[str, float]
    # (seconds, value) while the client ran: KV usage, prefix-cache hits and queries.
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        return float(self.probes[key] if key in self.probes else self.result[key])


PREFIX_HITS, PREFIX_QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"


# Columns of the table: (header, result key, scale to shown unit, decimals).
COLUMNS = (
    ("output tok/s", "output_throughput", 1.0, 2),
    ("mean TTFT s", "mean_ttft_ms", 1e-3, 2),
    ("p99 TTFT s", "p99_ttft_ms", 1e-3, 2),
    ("mean TPOT ms", "mean_tpot_ms", 1.0, 1),
    ("mean ITL ms", "mean_itl_ms", 1.0, 1),
    ("p99 ITL ms", "p99_itl_ms", 1.0, 1),
    ("peak running", "peak_running", 1.0, 0),
    ("preemptions", "preemptions", 1.0, 0),
    ("prefix hit rate", "prefix_hit_rate", 1.0, 2),
    ("peak KV usage", "peak_kv_usage", 1.0, 2),
    ("KV usage after", "idle_kv_usage", 1.0, 2),
)


@dataclass
class Comparison:
    """Everything the stage measured: each round's run by (side label, workload name), in
    the order of the rounds, and the log checks."""

    runs: dict[tuple[str, str], list[ClientRun]] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    entropy_flags: tuple[str, ...] = ()  # the entropy server's flags beyond its budget

    def sides(self, budget: float) -> tuple[Side, Side]:
        return sides(budget, self.entropy_flags)

    def add(self, side: str, workload: str, run: ClientRun) -> None:
        self.runs.setdefault((side, workload), []).append(run)

    def rounds(self, workload: str, budget: float) -> list[tuple[ClientRun, ClientRun]]:
        """(stock, entropy) runs of each round that measured both."""
        stock, entropy = (self.runs.get((side.label, workload), [])
                          for side in self.sides(budget))
        return list(zip(stock, entropy))


def client_command(url: str, workload: Workload, result_path: Path, warmups: int) -> list[str]:
    model = str(assets.prepare_model())
    return [vllm_executable(), "bench", "serve", "--backend", "openai", "--base-url", url,
            "--model", model, "--served-model-name", assets.SERVED_MODEL_NAME,
            "--tokenizer", model, *workload.client_args(), "--seed", str(SEED),
            "--num-warmups", str(warmups), "--disable-tqdm", "--save-result",
            "--result-dir", str(result_path.parent), "--result-filename", result_path.name]


def run_client(url: str, workload: Workload, result_path: Path, warmups: int,
               log_path: Path) -> ClientRun:
    """`vllm bench serve` against `url`, its output in `log_path`, its JSON at `result_path`."""
    before = {name: metric(url, name) for name in (
        "vllm:num_preemptions_total", PREFIX_HITS, PREFIX_QUERIES)}
    command = client_command(url, workload, result_path, warmups)
    result_path.unlink(missing_ok=True)
    with PeakSampler(url, "vllm:num_requests_running") as running, \
            PeakSampler(url, KV_USAGE) as usage, PeakSampler(url, PREFIX_HITS) as hits, \
            PeakSampler(url, PREFIX_QUERIES) as queries, log_path.open("w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False,
                                  env=client_environment())
    if finished.returncode != 0 or not result_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"vllm bench serve exited with {finished.returncode}:\n{tail}")
    delta = {name: metric(url, name) - value for name, value in before.items()}
    probes = {
        "peak_running": running.peak,
        "preemptions": delta["vllm:num_preemptions_total"],
        "prefix_hit_rate": delta[PREFIX_HITS] / delta[PREFIX_QUERIES]
        if delta[PREFIX_QUERIES] else 0.0,
        "peak_kv_usage": usage.peak,
        "idle_kv_usage": wait_for_idle_cache(url),
    }
    series = {KV_USAGE: usage.samples, PREFIX_HITS: hits.samples,
              PREFIX_QUERIES: queries.samples}
    return ClientRun(json.loads(result_path.read_text()), probes, series)


def client_environment() -> dict[str, str]:
    # No model hub here; the tokenizer is the local model directory.
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def scheduling_problems(log: str, stock: bool) -> list[str]:
    """What in a server's log says vLLM's scheduling defaults were not kept: chunked prefill
    off, async scheduling disabled by a flag (vLLM's CPU platform turns it off without a
    log line, on every server alike), or (stock only) any setting the plugin changed."""
    problems = []
    if "enable_chunked_prefill=True" not in log:
        problems.append("chunked prefill is off")
    if "'async_scheduling': False" in log or any(
            "Async scheduling" in line and "disabled" in line for line in log.splitlines()):
        problems.append("async scheduling is off")
    changed = [line for line in log.splitlines() if "vllm-entropy-kv: " in line]
    if stock and changed:
        problems.append(f"the plugin changed settings: {changed}")
    return problems


def adjustments(log: str) -> list[str]:
    """The settings the plugin logged as changed ("vllm-entropy-kv: NAME OLD -> NEW: why")."""
    return [line.split("vllm-entropy-kv: ", 1)[1].split(":", 1)[0]
            for line in log.splitlines() if "vllm-entropy-kv: " in line and " -> " in line]


def measure(comparison: Comparison, workloads: Sequence[Workload], budget: float,
            warmups: int, rounds: int, logs: Path, step: Callable[[str], None]) -> None:
    """Per round, per workload, start each side's server (fresh: an empty prefix cache),
    run the client against it and record the run. Rounds alternate the two servers, so a
    machine that slows down or speeds up weighs on both alike."""
    for round_index, workload, side in (
            (r, w, s) for r in range(rounds) for w in workloads
            for s in comparison.sides(budget)):
        name = f"vllm-bench-{side.policy}-{workload.name}-{round_index + 1}"
        server = VllmServer(logs / f"server-{name}.log", port=free_port(),
                            policy=side.policy,
                            extra_args=side.serve_flags(workload.kv_tokens))
        print(f"[bench] starting {side.label} server: {' '.join(server.command)}",
              file=sys.stderr, flush=True)
        with server:
            log = server.log_path.read_text(errors="replace")
            stock = side.policy == "none"
            problems = scheduling_problems(log, stock)
            if problems:
                raise RuntimeError(f"{side.label} server: {'; '.join(problems)} "
                                   f"(log: {server.log_path})")
            if workload is workloads[0] and round_index == 0:
                comparison.checks.append(
                    f"{side.label}: chunked prefill on (async scheduling off: vLLM's CPU "
                    "platform's choice); " + (
                        "no vllm-entropy-kv WARNING line" if stock else
                        "the plugin changed " + (", ".join(adjustments(log)) or "nothing")))
            comparison.add(side.label, workload.name, run_client(
                server.url, workload, logs / f"{name}.json", warmups,
                logs / f"client-{name}.log"))
        step(f"vllm bench serve, {side.label}, {workload.name}, round "
             f"{round_index + 1}/{rounds}")


def _cell(value: float, reference: float | None, decimals: int) -> str:
    return f"{value:.{decimals}f} ({report.ratio(value, reference)})"


def _median(runs: Sequence[ClientRun], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def comparison_table(comparison: Comparison, workloads: Sequence[Workload],
                     budget: float) -> str:
    """One row per server and workload: each column's median over the rounds, and its ratio
    to stock's median. Completed: requests over all rounds."""
    rows = []
    for workload in workloads:
        base = comparison.runs.get(("stock", workload.name))
        for side in comparison.sides(budget):
            runs = comparison.runs.get((side.label, workload.name))
            if not runs:
                continue
            completed = sum(int(run["completed"]) for run in runs)
            rows.append([
                side.label, workload.name, f"{completed}/{workload.num_prompts * len(runs)}",
                *[_cell(_median(runs, key) * scale, base and _median(base, key) * scale,
                        decimals)
                  for _, key, scale, decimals in COLUMNS],
            ])
    return report.table(["server", "workload", "completed", *[c[0] for c in COLUMNS]], rows)


# The goals' columns (issues 16 and 18), whose ratios get an interval over the rounds.
RATIO_COLUMNS = ("output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                 "prefix_hit_rate", "peak_kv_usage")


def rounds_table(comparison: Comparison, workloads: Sequence[Workload], budget: float) -> str:
    """Per workload and goal column: entropy's ratio to stock in each round (the two servers
    of a round ran back to back), their geometric mean and its 95% t-interval."""
    rows = []
    headers = {key: header for header, key, _, _ in COLUMNS}
    for workload in workloads:
        pairs = comparison.rounds(workload.name, budget)
        for key in RATIO_COLUMNS:
            ratios = [entropy[key] / stock[key] for stock, entropy in pairs if stock[key]]
            if not ratios:
                continue
            if min(ratios) > 0:
                mean, low, high = report.geometric_mean_interval(ratios)
                summary = f"{mean:.2f}x" + (f" [{low:.2f}, {high:.2f}]" if len(ratios) > 1
                                            else "")
            else:  # a round where entropy measured 0 (a sampled column): no geometric mean
                summary = "– (a ratio of 0)"
            rows.append([workload.name, headers[key], ", ".join(f"{r:.2f}" for r in ratios),
                         summary])
    return report.table(["workload", "column", "entropy / stock, per round",
                         "geometric mean [95% interval]"], rows)


def render(comparison: Comparison, workloads: Sequence[Workload], budget: float, command: str,
           started: str, dtype: str, warmups: int) -> str:
    from vllm_entropy_kv.engine.setup import COMPRESSION_BLOCK_SIZE

    stock_layout = report.attention_layout(dtype, STOCK_BLOCK_SIZE)
    entropy_side = comparison.sides(budget)[1]
    rounds = max((len(runs) for runs in comparison.runs.values()), default=0)
    workload_lines = [
        f"- **{w.name}**: `vllm bench serve --backend openai {' '.join(w.client_args())} "
        f"--seed {SEED} --num-warmups {warmups}` (ignore_eos, vLLM's default for random "
        f"prompts), KV pool of {w.kv_tokens} tokens of full KV ({w.pool_requests:g} requests "
        "uncompressed)"
        for w in workloads]
    return "\n".join([
        ("## Prefix caching: stock vLLM against `--kv-policy entropy`, with vLLM's own client"
         if any(w.prefix_len for w in workloads) else
         "## Stock vLLM against `--kv-policy entropy`, with vLLM's own client"),
        "",
        f"`{command}`, started {started}; "
        f"{report.machine_description(dtype, COMPRESSION_BLOCK_SIZE)}; stock runs vLLM's CPU "
        f"default {STOCK_BLOCK_SIZE}-token blocks (layout '{stock_layout}'). Two servers per "
        "workload, one after the other, each started by the launcher with the same dtype, "
        "`--max-model-len` and KV bytes (`--num-gpu-blocks-override`), in "
        f"{rounds} round{'s' if rounds != 1 else ''}, each on fresh servers: **stock** "
        "`--kv-policy none` (vLLM's defaults: chunked prefill, async scheduling as its CPU "
        "platform sets it (off), "
        "`max_num_batched_tokens`, block size) and "
        f"**{entropy_side.label}** `--kv-policy entropy {' '.join(entropy_side.extra_args)}` "
        "(32-token blocks, "
        "one KV cache group per layer; prefix caching on since 2026-12-05). Each cell is the "
        "median over the rounds and, in brackets, its ratio to stock's median on the same "
        "workload; the second table has the ratio of each round and their geometric mean "
        "with a 95% t-interval. Peak running and peak KV usage: "
        "`vllm:num_requests_running` and `vllm:kv_cache_usage_perc` (a fraction of the pool; "
        "vLLM counts cached free blocks as free) sampled every 0.25 s; preemptions: "
        "`vllm:num_preemptions_total` over the run; prefix hit rate: "
        "`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` over the run (warm-ups "
        "included); KV usage after: once the run ended and the cache went idle (60 s at "
        "most).",
        "",
        *workload_lines,
        "",
        "Server logs: " + "; ".join(comparison.checks) + ".",
        "",
        comparison_table(comparison, workloads, budget),
        "",
        rounds_table(comparison, workloads, budget),
    ])


def plot_over_time(comparison: Comparison, workload: Workload, budget: float,
                   path: Path) -> None:
    """KV usage and the prefix-cache hit rate so far, against time, for both servers on one
    workload in the first round (docs/img/)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (usage_ax, hits_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for side in comparison.sides(budget):
        runs = comparison.runs.get((side.label, workload.name))
        if not runs:
            continue
        run = runs[0]
        times, usage = zip(*run.series[KV_USAGE]) if run.series[KV_USAGE] else ((), ())
        usage_ax.plot(times, usage, label=side.label)
        hits, queries = run.series[PREFIX_HITS], run.series[PREFIX_QUERIES]
        if hits and queries:
            h0, q0 = hits[0][1], queries[0][1]
            rate = [((t, (h - h0) / (q - q0))) for (t, h), (_, q) in zip(hits, queries)
                    if q > q0]
            if rate:
                hits_ax.plot(*zip(*rate), label=side.label)
    usage_ax.set_ylabel("vllm:kv_cache_usage_perc")
    hits_ax.set_ylabel("prefix hit rate so far")
    hits_ax.set_xlabel("seconds since the client started")
    usage_ax.legend()
    usage_ax.set_title(f"{workload.name}: stock vLLM and {comparison.sides(budget)[1].label}, "
                       "same KV memory")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
