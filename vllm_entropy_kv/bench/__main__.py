"""`python -m vllm_entropy_kv.bench`: the serving benchmark, written to docs/BENCHMARKS.md.

Starts the servers it needs (or takes `--url`, a server started with a KV policy), one at a
time: a main server (`--kv-cache-gib`, default 4) for latency, batch decode and the needle,
and a small-pool server (`--capacity-kv-tokens`, default 20000) where many long requests
compete for blocks. Every request names its policy and budget in `vllm_xargs`, so all cells,
`none` included, run side by side on the same server, scheduling and memory, and each is
reported as a ratio to `none`. Progress goes to stderr; `--quick` shrinks the grid.

Perplexity through the server is not measured: compression runs at the end of a prompt's
prefill, so the prompt logprobs of a continuation are computed before it, from the full
cache, and would show no effect.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from vllm_entropy_kv.bench import report
from vllm_entropy_kv.bench.probes import (
    Cell,
    concurrent_batch,
    needle_hits,
    prompt_of_tokens,
    sampled_completion,
    timed_completion,
)
from vllm_entropy_kv.launch import DEFAULT_DTYPE, VllmServer, free_port, metric, pool_flags

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "BENCHMARKS.md"
PLOT = ROOT / "docs" / "img" / "bench.png"
LOGS = ROOT / "reports" / "bench"
COMPRESSING = ("entropy", "entropy-merge", "src", "streaming", "snapkv", "pyramid")
SUMMARISING = ("entropy-merge", "src")  # policies whose summary tokens take the merge bias


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
    parser.add_argument("--capacity-url", help="a running small-memory server for capacity")
    parser.add_argument("--policies", default=",".join(COMPRESSING))
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
    parser.add_argument("--kv-cache-gib", default="4")
    parser.add_argument("--capacity-kv-tokens", type=int, default=20000,
                        help="KV pool of the capacity server, tokens of full KV")
    parser.add_argument("--quick", action="store_true",
                        help="entropy and snapkv at 0.25, 1000/3000 tokens, batch 4, 3 depths")
    parser.add_argument("--no-docs", action="store_true", help="print only, leave docs/")
    args = parser.parse_args(argv)
    if args.quick:
        args.policies, args.budgets, args.lengths = "entropy,snapkv", "0.25", "1000,3000"
        args.batch, args.capacity_requests, args.needle_depths = 4, 12, "0.1,0.5,0.9"
    args.policies = [p for p in args.policies.split(",") if p]
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.capacity_budgets = ([float(b) for b in args.capacity_budgets.split(",")]
                             if args.capacity_budgets else args.budgets)
    args.lengths = [int(n) for n in args.lengths.split(",")]
    args.needle_depths = [float(d) for d in args.needle_depths.split(",")]
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
    headline = [Cell(p, 0.25) for p in args.policies]
    # Summaries with and without their log(count) bias, side by side on the same haystacks.
    unbiased = [Cell(p, 0.25, (("kv_merge_bias", False),))
                for p in args.policies if p in SUMMARISING]
    cells = [none] + [Cell(p, b) for p in args.policies for b in args.budgets]
    sweep = [none, Cell("entropy", 0.25)]
    longest = max(args.lengths)
    results = report.Results(needle_cases=len(args.needle_depths))
    total = (len(sweep) * len(args.lengths) + len(cells) + 2 + len(args.capacity_budgets) + 1
             + len([none] + headline + unbiased))
    progress = Progress(total)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    def main_server(url: str) -> None:
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
        for policy in args.policies:
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

    def capacity_server(url: str) -> None:
        prompts = [prompt_of_tokens(args.capacity_length, 1231 * i)
                   for i in range(args.capacity_requests)]
        for cell in [none] + [Cell("entropy", b) for b in args.capacity_budgets]:
            results.capacity[cell.label] = concurrent_batch(url, prompts, cell, 32)
            progress.step(f"capacity {cell.label}")

    command = "python -m vllm_entropy_kv.bench " + " ".join(
        argv if argv is not None else sys.argv[1:])
    failures: list[str] = []

    def publish(unfinished: Sequence[str]) -> str:
        """Render what has been measured and write it to docs/ (after every stage, so a run
        cut short still leaves its finished stages)."""
        text = render(args, results, cells, sweep, headline + unbiased, command.strip(), started)
        text += "".join(f"\n\n**Not measured**: {failure}" for failure in failures)
        text += "".join(f"\n\n**Not measured yet**: the {stage} stage was still to run when "
                        "this was written." for stage in unfinished)
        if not args.no_docs:
            report.plot(results, cells, args.lengths, PLOT)
            report.write_section(DOCS, "bench",
                                 text + f"\n\n![bench]({PLOT.relative_to(DOCS.parent)})")
            print(f"[bench] written to {DOCS} and {PLOT}", file=sys.stderr, flush=True)
        return text

    # A stage that fails is reported, and what the other stages measured is still written.
    stages = [
        ("main", args.url, (), args.kv_cache_gib, main_server),
        ("capacity", args.capacity_url, pool_flags("entropy", args.capacity_kv_tokens), None,
         capacity_server),
    ]
    for i, (stage, url, flags, kv_gib, run) in enumerate(stages):
        try:
            with_server(url, stage, flags, kv_gib, run)
        except Exception as e:  # noqa: BLE001 - any failure of a stage ends only that stage
            print(f"[bench] the {stage} stage failed: {e!r}", file=sys.stderr, flush=True)
            failures.append(f"the {stage} stage failed: {str(e).splitlines()[0]}")
        text = publish([later for later, *_ in stages[i + 1:]])
    print(text)
    return 1 if failures else 0


def render(args, results, cells, sweep, needle_cells, command: str, started: str) -> str:
    mid = sorted(args.lengths)[len(args.lengths) // 2]
    entropy_capacity = [Cell("entropy", b) for b in args.capacity_budgets]
    lines = [
        "## Serving benchmark",
        "",
        f"`{command}`, started {started}; model SmolLM2-135M-Instruct ({DEFAULT_DTYPE}, "
        f"vLLM 0.32.0 CPU, `--enforce-eager`), {platform.machine()} machine, "
        f"{len(os.sched_getaffinity(0))} cores. Every cell ran on the same "
        "server through per-request settings (`vllm_xargs`), one after the other; ratios "
        f"are to `none` on that server. Main server KV cache {args.kv_cache_gib} GiB, "
        f"capacity server a pool of {args.capacity_kv_tokens} tokens.",
        "",
        "### One request at a time: TTFT and time per output token against prompt length",
        "",
        report.single_table(results, sweep, args.lengths),
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
        "Mean TPOT counts every gap between a request's tokens, including the whole-prompt "
        "prefills of the other requests that the engine runs between its decode steps; "
        "*TPOT all decoding* is read only while every request of the batch decodes (from "
        "the last first token to the first request's end), where reading the KV cache is "
        "what grows with context.",
        "",
        f"### Capacity: {args.capacity_requests} requests of {args.capacity_length} tokens at "
        f"once in a KV pool of {args.capacity_kv_tokens} tokens",
        "",
        report.batch_table(results.capacity, [Cell("none")] + entropy_capacity),
        "",
        f"### Needle in a haystack through the server ({args.needle_length} tokens, depths "
        f"{args.needle_depths})",
        "",
        report.needle_table(results, [Cell("none")] + needle_cells),
        "",
        "Perplexity through the server: not measured (the prompt logprobs of a continuation "
        "are computed during prefill, before compression).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
