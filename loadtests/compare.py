"""The same locust load against `none` and a KV policy, side by side, in the same KV memory.

Runs `loadtests/run.py` once per policy, one server at a time (each started here with the
same KV pool size and vLLM flags), and writes a table to `docs/BENCHMARKS.md` between
the markers of its section, so other sections of that file stay as they are:

    python loadtests/compare.py --profile long --users 6 --duration 240 --kv-tokens 8000
    make loadtest-compare
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import run as loadtest

from vllm_entropy_kv.bench.report import machine_description
from vllm_entropy_kv.bench.vllm_client import STOCK_BLOCK_SIZE
from vllm_entropy_kv.bench.sections import write_section
from vllm_entropy_kv.engine.setup import COMPRESSION_BLOCK_SIZE
from vllm_entropy_kv.launch import default_dtype, pool_flags

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"


def run_policy(args: argparse.Namespace, policy: str) -> dict:
    name = f"compare-{args.profile}-{policy}"
    # The `none` side is stock vLLM: its own block size; the same KV bytes.
    block_size = STOCK_BLOCK_SIZE if policy == "none" else None
    argv = ["--profile", args.profile, "--users", str(args.users), "--duration",
            str(args.duration), "--spawn-rate", str(args.users), "--policy", policy,
            "--out", str(args.out), "--name", name,
            "--", *pool_flags(policy, args.kv_tokens, block_size)]
    if policy != "none":
        argv += ["--kv-budget", str(args.budget)]
    code = loadtest.main(argv)
    result = json.loads((args.out / f"{name}_result.json").read_text())
    result["exit_code"] = code
    return result


def _fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, dict]) -> str:
    policies = list(results)
    head = "| | " + " | ".join(f"`{p}`" for p in policies) + " |"
    lines = [head, "|---|" + "---:|" * len(policies)]

    def row(label: str, values: Sequence[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    row("requests (all entries)", [str(sum(
        n for name, n in r["requests"].items() if r["types"].get(name) != "METRIC"
        and name != "Aggregated")) for r in results.values()])
    row("failures", [str(sum(
        n for name, n in r["failures"].items() if name != "Aggregated"))
        for r in results.values()])
    row("output tokens / s", [_fmt(r["output_tokens_per_s"], 2) for r in results.values()])
    row("prompt tokens served", [str(r["prompt_tokens"]) for r in results.values()])
    row("preemptions", [str(r["preemptions"]) for r in results.values()])
    row("requests compressed", [str(r["compressed_requests"]) for r in results.values()])
    row("prefix cache hit rate", [_fmt(r.get("prefix_hit_rate"), 3) for r in results.values()])
    row("peak KV usage", [_fmt(r.get("peak_kv_usage"), 3) for r in results.values()])
    row("KV usage after", [_fmt(r.get("kv_cache_usage_after"), 3) for r in results.values()])
    names = sorted({n for r in results.values() for n in r["requests"] if n != "Aggregated"})
    for name in names:
        for key, label in (("p50_ms", "p50"), ("p95_ms", "p95")):
            row(f"{name} {label} (ms)", [_fmt(r[key].get(name)) for r in results.values()])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=loadtest.PROFILES, default="long")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--duration", type=int, default=240, help="seconds per policy")
    parser.add_argument("--policy", default="entropy", help="compared with none")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--kv-tokens", type=int, default=8000,
                        help="KV pool of both servers, in tokens of full KV (all layers)")
    parser.add_argument("--out", type=Path, default=loadtest.REPORTS)
    parser.add_argument("--no-docs", action="store_true", help="print only, leave docs/")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = {policy: run_policy(args, policy) for policy in ("none", args.policy)}
    command = "python loadtests/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        "## Load test, profile `{}`: stock vLLM (`none`) vs `{}` at {} (locust)".format(
            args.profile, args.policy, args.budget),
        "",
        f"`{command.strip()}` on {started}: profile `{args.profile}`, {args.users} users, "
        f"{args.duration} s per server, a KV pool of {args.kv_tokens} tokens for both "
        f"(`--num-gpu-blocks-override`: `none` is stock vLLM with its {STOCK_BLOCK_SIZE}-token "
        "blocks of all layers, the policy has 32-token blocks of one layer each), vLLM's "
        "defaults otherwise (chunked prefill, prefix caching; async scheduling off, as vLLM's "
        "CPU platform sets it), one server "
        "at a time; "
        f"{machine_description(default_dtype(), COMPRESSION_BLOCK_SIZE)}. Latencies are of "
        "whole requests (streams included); TTFT/TPOT rows are the locust METRIC entries.",
        "",
        table(results),
    ])
    print(text)
    if not args.no_docs:
        write_section(BENCHMARKS, f"loadtest-compare-{args.profile}", text)
        print(f"written to {BENCHMARKS}")
    return max(r["exit_code"] for r in results.values())


if __name__ == "__main__":
    sys.exit(main())
