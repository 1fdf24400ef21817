"""`python -m vllm_entropy_kv.bench`: the serving benchmark, written to docs/BENCHMARKS.md.

Starts the servers it needs (or takes `--url`, a server started with a KV policy), one at a
time: a main server (`--kv-cache-gib`, default 4) for latency, batch decode, the needle and
perplexity, and a small-pool server (`--capacity-kv-tokens`, default 20000) where many long
requests compete for blocks. Every request names its policy and budget in `vllm_xargs`, so
all cells, `none` included, run side by side on the same server, scheduling and memory, and
each is reported as a ratio to `none`. Progress goes to stderr; `--quick` shrinks the grid;
`--stages` picks stages (the perplexity stage writes its own section of the page).

`--stages vllm-bench` (not in the default list: four servers and four `vllm bench serve` runs
per round, `--vllm-bench-rounds` of them, 3 by default, alternating the servers) compares stock vLLM with its defaults
against `--kv-policy entropy` at the same KV memory through vLLM's own client, in its own
section (`vllm_entropy_kv.bench.vllm_client`). `--stages prefix-cache` (not in the default
list either) runs the same two servers on vLLM's `prefix_repetition` dataset, prefix caching
on in both, into its own section and a plot of KV usage and hit rate over time.

Perplexity is scored by teacher forcing (`vllm_entropy_kv.forced_tokens`), not with prompt
logprobs: those are computed during the prefill, before compression, and would show nothing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_entropy_kv.bench import report, vllm_client
from vllm_entropy_kv.bench.sections import write_section
from vllm_entropy_kv.eval.ruler.stats import BOOTSTRAP_RESAMPLES
from vllm_entropy_kv.eval.texts import perplexity_documents
from vllm_entropy_kv.bench.probes import (
    Cell,
    concurrent_batch,
    continuation_nll,
    encode,
    needle_hits,
    parse_policy,
    prompt_of_tokens,
    sampled_completion,
    timed_completion,
)
from vllm_entropy_kv.engine.setup import COMPRESSION_BLOCK_SIZE
from vllm_entropy_kv.launch import VllmServer, default_dtype, free_port, metric, pool_flags

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "BENCHMARKS.md"
PLOT = ROOT / "docs" / "img" / "bench.png"
LOGS = ROOT / "reports" / "bench"
COMPRESSING = ("entropy", "entropy-merge", "src", "streaming", "snapkv", "pyramid")
SUMMARISING = ("entropy-merge", "src")  # policies whose summary tokens take the merge bias
STAGES = ("main", "perplexity", "capacity")
ALL_STAGES = STAGES + ("vllm-bench", "prefix-cache")
PREFIX_PLOT = ROOT / "docs" / "img" / "prefix_cache.png"


class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        print(f"[bench] {self.done}/{self.total} {what} (elapsed {elapsed / 60:.1f} min)",
              file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server with a KV policy (skips start-up)")
    parser.add_argument("--url-dtype", help="the dtype of the --url server, for the report's "
                        "header (default: the launcher's default on this CPU)")
    parser.add_argument("--capacity-url", help="a running small-memory server for capacity")
    parser.add_argument("--policies", default=",".join(COMPRESSING),
                        help="comma-separated NAME[:kv_FIELD=VALUE...], e.g. "
                        "entropy:kv_recent_tokens=128 (per-request settings, as vllm_xargs)")
    parser.add_argument("--budgets", default="0.1,0.25,0.5")
    parser.add_argument("--capacity-budgets", help="entropy budgets of the capacity test "
                        "(default: --budgets)")
    parser.add_argument("--lengths", default="1000,3000,7000", help="prompt tokens")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="concurrent requests, longest length")
    # 2000-token prompts: at 25%% a request holds 18 blocks of 32 tokens at its end (513
    # kept + 32 output) against 64 in full, a bound of 3.56x; the pool holds 9 in full.
    parser.add_argument("--capacity-requests", type=int, default=36,
                        help="more than fit in the pool at 25%% kept")
    parser.add_argument("--capacity-length", type=int, default=2000)
    parser.add_argument("--needle-length", type=int, default=3000)
    parser.add_argument("--needle-depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--perplexity-context", type=int, default=2048,
                        help="tokens of each text window that are compressed")
    parser.add_argument("--perplexity-continuation", type=int, default=128,
                        help="tokens after the context that are scored")
    parser.add_argument("--perplexity-windows", default="3,2",
                        help="text windows: Shakespeare plays, Britannica")
    parser.add_argument("--perplexity-concurrency", type=int, default=8,
                        help="perplexity requests in flight at once")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated, of {', '.join(ALL_STAGES)} (default: "
                        f"{', '.join(STAGES)})")
    parser.add_argument("--kv-cache-gib", default="4")
    parser.add_argument("--capacity-kv-tokens", type=int, default=20000,
                        help="KV pool of the capacity server, tokens of full KV")
    parser.add_argument("--quick", action="store_true",
                        help="entropy and snapkv at 0.25, 1000/3000 tokens, batch 4, 3 depths; "
                        "vllm-bench: 1000-token prompts, 8 and 16 of them")
    parser.add_argument("--no-docs", action="store_true", help="print only, leave docs/")
    vllm_client.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.policies, args.budgets, args.lengths = "entropy,snapkv", "0.25", "1000,3000"
        args.batch, args.capacity_requests, args.needle_depths = 4, 12, "0.1,0.5,0.9"
        args.perplexity_windows = "1,1"
        args.vllm_bench_input_len, args.vllm_bench_prompts = 1000, 8
        args.vllm_bench_pressure_prompts = args.vllm_bench_pressure_concurrency = 16
    if args.url_dtype and not args.url:
        parser.error("--url-dtype names the dtype of a server given by --url")
    try:
        args.policies = [parse_policy(p) for p in args.policies.split(",") if p]
    except ValueError as error:
        parser.error(f"--policies: {error}")
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.capacity_budgets = ([float(b) for b in args.capacity_budgets.split(",")]
                             if args.capacity_budgets else args.budgets)
    args.lengths = [int(n) for n in args.lengths.split(",")]
    args.needle_depths = [float(d) for d in args.needle_depths.split(",")]
    args.perplexity_windows = [int(n) for n in args.perplexity_windows.split(",")]
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(args.stages) - set(ALL_STAGES))
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)} (valid: {', '.join(ALL_STAGES)})")
    return args


def with_server(url: str | None, name: str, extra_args: Sequence[str], kv_gib: str | None,
                run: Callable[[str], None]) -> None:
    """Run `run(url)` against `url`, or against a server started here with `entropy`."""
    if url:
        run(url.rstrip("/"))
        return
    server = VllmServer(LOGS / f"server-{name}.log", port=free_port(), policy="entropy",
                        extra_args=extra_args, kv_cache_gib=kv_gib)
    print(f"[bench] starting {name} server: {' '.join(server.command)}", file=sys.stderr,
          flush=True)
    with server:
        run(server.url)


def compaction_seconds(url: str, policy: str) -> float | None:
    """Mean seconds the worker spent planning and compacting one request of `policy`."""
    name, label = "vllm_entropy_kv_compaction_seconds", f'policy="{policy}"'
    count = metric(url, name + "_count", label)
    return metric(url, name + "_sum", label) / count if count else None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    none = Cell("none")
    headline = [Cell(p, 0.25, s) for p, s in args.policies]
    # Summaries with and without their log(count) bias, side by side on the same inputs.
    unbiased = [Cell(p, 0.25, (*s, ("kv_merge_bias", False)))
                for p, s in args.policies if p in SUMMARISING]
    cells = [none] + [Cell(p, b, s) for p, s in args.policies for b in args.budgets]
    sweep = [none, Cell("entropy", 0.25)]
    longest = max(args.lengths)
    results = report.Results(needle_cases=len(args.needle_depths))
    plays, britannica = args.perplexity_windows
    documents = perplexity_documents(encode, plays, britannica, args.perplexity_context,
                                     args.perplexity_continuation
                                     ) if "perplexity" in args.stages else []
    steps = {
        "main": len(sweep) * len(args.lengths) + len(cells) + 2 + len([none] + headline + unbiased),
        "perplexity": len(cells + unbiased),
        "capacity": len(args.capacity_budgets) + 1,
        # Stock and entropy, each round.
        "vllm-bench": 2 * len(vllm_client.workloads(args)) * args.vllm_bench_rounds,
        "prefix-cache": 2 * args.vllm_bench_rounds,
    }
    progress = Progress(sum(steps[stage] for stage in args.stages))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    def main_stage(url: str) -> None:
        # A first request of each policy pays one-time costs (imports, first kernels: the
        # first entropy request of the last run had a 1.1 s longer TTFT at 1k tokens); none
        # of them should land in a measured cell.
        for cell in [none] + headline:
            timed_completion(url, prompt_of_tokens(300), cell, 2)
        # One request at a time: TTFT and TPOT against length, then every cell at 3k-ish.
        for cell in sweep:
            for length in args.lengths:
                results.single[(cell.label, length)] = sampled_completion(
                    url, prompt_of_tokens(length), cell, args.output_tokens)
                progress.step(f"single {cell.label} {length} tokens")
        mid = sorted(args.lengths)[len(args.lengths) // 2]
        for cell in cells:
            if (cell.label, mid) not in results.single:
                results.single[(cell.label, mid)] = sampled_completion(
                    url, prompt_of_tokens(mid), cell, args.output_tokens)
            progress.step(f"single {cell.label} {mid} tokens")
        for policy in dict.fromkeys(p for p, _ in args.policies):
            seconds = compaction_seconds(url, policy)
            if seconds is not None:
                results.prefill_seconds[policy] = seconds
        # Batch decode at the longest length, where reading the KV cache dominates.
        for cell in sweep:
            prompts = [prompt_of_tokens(longest, 997 * i) for i in range(args.batch)]
            results.batch[cell.label] = concurrent_batch(url, prompts, cell, args.output_tokens)
            progress.step(f"batch of {args.batch} x {longest} tokens, {cell.label}")
        for cell in [none] + headline + unbiased:
            results.needle[cell.label] = needle_hits(url, cell, args.needle_length,
                                                     args.needle_depths)
            progress.step(f"needle {cell.label}")

    def perplexity_stage(url: str) -> None:
        # Every cell's documents in flight together (per-request policies share the batch):
        # a 1,024-token forced continuation is 1,024 decode steps.
        with ThreadPoolExecutor(max_workers=args.perplexity_concurrency) as pool:
            for cell in cells + unbiased:
                results.perplexity[cell.label] = list(
                    pool.map(lambda d, c=cell: continuation_nll(url, d, c), documents))
                progress.step(f"perplexity {cell.label}")

    def capacity_stage(url: str) -> None:
        prompts = [prompt_of_tokens(args.capacity_length, 1231 * i)
                   for i in range(args.capacity_requests)]
        for cell in [none] + [Cell("entropy", b) for b in args.capacity_budgets]:
            results.capacity[cell.label] = concurrent_batch(url, prompts, cell, 32)
            progress.step(f"capacity {cell.label}")

    entropy_flags = tuple(shlex.split(args.vllm_bench_entropy_flags))
    comparison = vllm_client.Comparison(entropy_flags=entropy_flags)
    workloads = vllm_client.workloads(args)

    def vllm_bench_stage(_url: str) -> None:
        vllm_client.measure(comparison, workloads, args.vllm_bench_budget,
                            args.vllm_bench_warmups, args.vllm_bench_rounds, LOGS,
                            progress.step)

    prefix_comparison = vllm_client.Comparison(entropy_flags=entropy_flags)
    prefix_workloads = [vllm_client.prefix_workload(args)]

    def prefix_cache_stage(_url: str) -> None:
        vllm_client.measure(prefix_comparison, prefix_workloads, args.vllm_bench_budget,
                            args.vllm_bench_warmups, args.vllm_bench_rounds, LOGS,
                            progress.step)

    command = "python -m vllm_entropy_kv.bench " + " ".join(
        argv if argv is not None else sys.argv[1:])
    failures: dict[str, str] = {}
    done: list[str] = []

    def publish() -> str:
        """Render what has been measured and write it to docs/ (after every stage, so a run
        cut short still leaves its finished stages)."""
        header = report_header(args, command.strip(), started)
        sections = {
            "bench": ("main", "capacity"),
            "bench-perplexity": ("perplexity",),
            "bench-vllm": ("vllm-bench",),
            "bench-prefix-cache": ("prefix-cache",),
        }
        texts = {
            "bench": lambda: render(args, results, cells, sweep, headline + unbiased, header),
            "bench-perplexity": lambda: render_perplexity(args, results, cells + unbiased,
                                                          documents, header),
            "bench-vllm": lambda: vllm_client.render(
                comparison, workloads, args.vllm_bench_budget, command.strip(), started,
                default_dtype(), args.vllm_bench_warmups),
            "bench-prefix-cache": lambda: vllm_client.render(
                prefix_comparison, prefix_workloads, args.vllm_bench_budget, command.strip(),
                started, default_dtype(), args.vllm_bench_warmups),
        }
        printed = []
        for section, its_stages in sections.items():
            ran = [stage for stage in its_stages if stage in args.stages]
            if not ran:
                continue
            text = texts[section]() + "".join(
                f"\n\n**Not measured**: the {stage} stage failed: {failures[stage]}"
                for stage in ran if stage in failures) + "".join(
                f"\n\n**Not measured yet**: the {stage} stage was still to run when this "
                "was written." for stage in ran if stage not in done)
            printed.append(text)
            if not args.no_docs:
                if section == "bench":
                    report.plot(results, cells, args.lengths, PLOT)
                    text += f"\n\n![bench]({PLOT.relative_to(DOCS.parent)})"
                if section == "bench-prefix-cache" and prefix_comparison.runs:
                    vllm_client.plot_over_time(prefix_comparison, prefix_workloads[0],
                                               args.vllm_bench_budget, PREFIX_PLOT)
                    text += f"\n\n![prefix cache]({PREFIX_PLOT.relative_to(DOCS.parent)})"
                write_section(DOCS, section, text)
        if not args.no_docs:
            print(f"[bench] written to {DOCS}", file=sys.stderr, flush=True)
        return "\n\n".join(printed)

    def fail(stage: str, error: Exception) -> None:
        print(f"[bench] the {stage} stage failed: {error!r}", file=sys.stderr, flush=True)
        failures[stage] = str(error).splitlines()[0]

    def run_stages(stages: Sequence[tuple[str, Callable[[str], None]]]) -> Callable[[str], None]:
        def run(url: str) -> None:
            for stage, measure in stages:
                try:
                    measure(url)
                except Exception as e:  # noqa: BLE001 - a failed stage ends only itself
                    fail(stage, e)
                done.append(stage)
                publish()
        return run

    servers = [
        ("main", args.url, (), args.kv_cache_gib,
         [("main", main_stage), ("perplexity", perplexity_stage)]),
        ("capacity", args.capacity_url, pool_flags("entropy", args.capacity_kv_tokens), None,
         [("capacity", capacity_stage)]),
        # Starts its own servers (stock and entropy, one pool per workload).
        ("vllm-bench", None, None, None, [("vllm-bench", vllm_bench_stage)]),
        ("prefix-cache", None, None, None, [("prefix-cache", prefix_cache_stage)]),
    ]
    for name, url, flags, kv_gib, stages in servers:
        chosen = [(stage, measure) for stage, measure in stages if stage in args.stages]
        if not chosen:
            continue
        try:
            if flags is None:  # the stage starts its own servers
                run_stages(chosen)("")
            else:
                with_server(url, name, flags, kv_gib, run_stages(chosen))
        except Exception as e:  # noqa: BLE001 - the server failed: its stages are not measured
            for stage, _ in chosen:
                if stage not in done:
                    fail(stage, e)
                    done.append(stage)
            publish()
    print(publish())
    return 1 if failures else 0


def report_header(args: argparse.Namespace, command: str, started: str) -> str:
    return (
        f"`{command}`, started {started}; "
        f"{report.machine_description(args.url_dtype or default_dtype(), COMPRESSION_BLOCK_SIZE)}"
        ". Every cell "
        "ran on the same server through per-request settings (`vllm_xargs`), one after the "
        f"other; ratios are to `none` on that server. Main server KV cache {args.kv_cache_gib} GiB"
        + (f", capacity server a pool of {args.capacity_kv_tokens} tokens."
           if "capacity" in args.stages else ".")
    )


def render(args, results, cells, sweep, needle_cells, header: str) -> str:
    mid = sorted(args.lengths)[len(args.lengths) // 2]
    entropy_capacity = [Cell("entropy", b) for b in args.capacity_budgets]
    lines = [
        "## Serving benchmark",
        "",
        header,
        "",
        "### One request at a time: TTFT and time per output token against prompt length",
        "",
        report.single_table(results, sweep, args.lengths),
        "",
        "Peak KV use is sampled over the whole request, prefill included: under chunked "
        "prefill a prompt holds all its blocks until its last chunk, so for long prompts the "
        "peak is the prompt's own size with or without compression; the saving shows while "
        "decoding (the batch and capacity tables).",
        "",
        f"### Every cell, one request of about {mid} tokens, {args.output_tokens} output tokens",
        "",
        report.single_table(results, cells, [mid]),
        "",
        "Mean seconds the worker spent scoring, planning and compacting one request "
        "(`vllm_entropy_kv_compaction_seconds`): "
        + ", ".join(f"{p} {s:.2f} s" for p, s in sorted(results.prefill_seconds.items())),
        "",
        f"### {args.batch} concurrent requests of {max(args.lengths)} tokens",
        "",
        report.batch_table(results.batch, sweep),
        "",
        "Mean TPOT counts every gap between a request's tokens, including the prefill "
        "chunks of the other requests that the engine runs in its decode steps; "
        "*TPOT all decoding* is read only while every request of the batch decodes (from "
        "the last first token to the first request's end), where reading the KV cache is "
        "what grows with context.",
        "",
        *([
            f"### Capacity: {args.capacity_requests} requests of {args.capacity_length} "
            f"tokens at once in a KV pool of {args.capacity_kv_tokens} tokens",
            "",
            report.batch_table(results.capacity, [Cell("none")] + entropy_capacity),
            "",
        ] if results.capacity else []),
        f"### Needle in a haystack through the server ({args.needle_length} tokens, depths "
        f"{args.needle_depths})",
        "",
        report.needle_table(results, [Cell("none")] + needle_cells),
    ]
    return "\n".join(lines)


def render_perplexity(args, results, cells, documents, header: str) -> str:
    return "\n".join([
        "## Perplexity through the server",
        "",
        header,
        "",
        f"{len(documents)} windows of real text ({', '.join(d.name for d in documents)}): "
        f"each request's prompt is {args.perplexity_context} tokens of a window, compressed "
        f"at the end of its prefill; the {args.perplexity_continuation} tokens after them are "
        "decoded by teacher forcing (`vllm_xargs.forced_token_ids`) and scored with the "
        "model's logprobs, all but the first (predicted before compression), "
        f"{args.perplexity_concurrency} requests in flight. Perplexity is token-weighted over "
        "the windows; the interval of a ratio to `none` resamples whole windows, paired "
        f"with `none`'s ({BOOTSTRAP_RESAMPLES} resamples).",
        "",
        report.perplexity_table(results, cells),
    ])


if __name__ == "__main__":
    sys.exit(main())
