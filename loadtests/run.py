"""Headless locust runs against `vllm serve`: `make loadtest` and `make soak`.

Starts a real server on the embedded model with `VllmServer` (or uses `--url`, which must be
on this machine), runs `loadtests/locustfile.py` for a bounded time with a bounded number of
users, and writes locust's CSV and HTML reports under `reports/loadtest/`.

`--soak-minutes N` runs for N minutes instead and then checks, exiting non-zero on any miss:
the server still answers /health; `vllm:kv_cache_usage_perc` is back to 0 within a minute
of the end; the resident memory (RSS, summed over the server's process group, read from
/proc) did not grow by more than `--max-rss-growth-mib` between the first and the last
minute of the run.
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import requests

from vllm_entropy_kv.bench.probes import PeakSampler
from vllm_entropy_kv.launch import VllmServer, free_port, metric, wait_for_idle_cache

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
REPORTS = ROOT / "reports" / "loadtest"
PROFILES = ("short", "long", "mix", "chat")
MAX_USERS = 64
MAX_DURATION_S = 24 * 3600
KV_USAGE = "vllm:kv_cache_usage_perc"
# Server counters read before and after a run; their differences go into the result.
COUNTERS = {
    "generated_tokens": "vllm:generation_tokens_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "preemptions": "vllm:num_preemptions_total",
    "compressed_requests": "vllm_entropy_kv_requests_compressed_total",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "prefix_cache_queries": "vllm:prefix_cache_queries_total",
}
RSS_SAMPLE_S = 5.0


# --- the server -------------------------------------------------------------------------------


def check_local(url: str) -> str:
    """Load goes to this machine only: refuse any host that is not a loopback address."""
    host = urlparse(url).hostname or ""
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise SystemExit(f"--url {url}: load tests only target this machine "
                             "(127.0.0.0/8, ::1 or localhost)")
    return url.rstrip("/")


def healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=10).status_code == 200
    except requests.RequestException:
        return False


# --- memory of the server's process group ----------------------------------------------------


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which may hold spaces: state ppid pgrp ...
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def group_rss_bytes(pgid: int) -> tuple[int, int]:
    """(sum of RSS in bytes, number of processes) of a process group."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = count = 0
    for pid in group_pids(pgid):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            count += 1
        except (OSError, IndexError, ValueError):
            continue
    return total, count


@dataclass
class RssSampler:
    """Samples the group's RSS every few seconds in a thread: (seconds since start, bytes)."""

    pgid: int
    interval_s: float = RSS_SAMPLE_S
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            rss, count = group_rss_bytes(self.pgid)
            self.samples.append((time.monotonic() - self._t0, rss, count))
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def first_and_last_minute_mib(self) -> tuple[float, float]:
        """Mean RSS (MiB) over the samples of the first and of the last minute."""
        end = self.samples[-1][0]
        first = [rss for t, rss, _ in self.samples if t <= 60]
        last = [rss for t, rss, _ in self.samples if t >= end - 60]
        mib = 1024 * 1024
        return sum(first) / len(first) / mib, sum(last) / len(last) / mib


# --- locust -----------------------------------------------------------------------------------


def locust_command(url: str, users: int, spawn_rate: float, duration_s: int, prefix: Path,
                   extra: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", url, "--users", str(users), "--spawn-rate", str(spawn_rate),
        "--run-time", f"{duration_s}s",
        # Users finish the request they are in; the run still ends within this bound.
        "--stop-timeout", "60",
        "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
        *extra,
    ]


def read_stats(prefix: Path) -> list[dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return list(csv.DictReader(f))


def _float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _ms(value: str) -> str:
    number = _float(value)
    return value if number is None else f"{number:.0f}"


def summary(rows: list[dict[str, str]]) -> str:
    lines = [f"{'type':<7} {'name':<30} {'count':>6} {'fail':>5} {'median':>8} {'p95':>8}  (ms)"]
    for row in rows:
        lines.append(
            f"{row['Type']:<7} {row['Name']:<30} {row['Request Count']:>6} "
            f"{row['Failure Count']:>5} {_ms(row['Median Response Time']):>8} {_ms(row['95%']):>8}"
        )
    return "\n".join(lines)


def usage_after(url: str) -> float | None:
    """KV usage once the cache went idle (a minute at most); None if the server is gone."""
    try:
        return wait_for_idle_cache(url, 60)
    except requests.RequestException:
        return None


def run(args: argparse.Namespace, url: str, pgid: int | None) -> int:
    soak = args.soak_minutes is not None
    duration_s = int(args.soak_minutes * 60) if soak else args.duration
    name = args.name or f"{'soak' if soak else 'loadtest'}-{args.profile}-{args.policy}"
    prefix = args.out / name
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LOADTEST_PROFILE": args.profile,
           "LOADTEST_KV_BUDGETS": args.kv_budgets}
    command = locust_command(url, args.users, args.spawn_rate, duration_s, prefix,
                             shlex.split(args.locust_args))
    print("+ " + " ".join(command), file=sys.stderr, flush=True)

    counters_before = {key: metric(url, name) for key, name in COUNTERS.items()}
    started = time.monotonic()
    sampler = RssSampler(pgid).start() if soak and pgid is not None else None
    # Bounded: locust stops itself after the run time; this is the backstop.
    timeout = duration_s + 300
    try:
        with PeakSampler(url, KV_USAGE) as kv_usage:
            code = subprocess.run(command, env=env, cwd=ROOT, timeout=timeout,
                                  check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"locust did not stop within {timeout}s", file=sys.stderr)
        code = 1
    finally:
        if sampler is not None:
            sampler.stop()

    elapsed_s = time.monotonic() - started
    counted = {key: metric(url, name) - counters_before[key] for key, name in COUNTERS.items()}
    rows = read_stats(prefix)
    print(summary(rows))
    print(f"reports: {prefix}_stats.csv, {prefix}.html")
    result: dict[str, object] = {
        "url": url, "profile": args.profile, "policy": args.policy, "users": args.users,
        "duration_s": duration_s, "locust_exit_code": code,
        "requests": {r["Name"]: int(r["Request Count"]) for r in rows},
        "failures": {r["Name"]: int(r["Failure Count"]) for r in rows},
        "p50_ms": {r["Name"]: _float(r["Median Response Time"]) for r in rows},
        "p95_ms": {r["Name"]: _float(r["95%"]) for r in rows},
        "types": {r["Name"]: r["Type"] for r in rows},
        "elapsed_s": round(elapsed_s, 1),
        **{key: round(value) for key, value in counted.items()},
        "output_tokens_per_s": round(counted["generated_tokens"] / elapsed_s, 2),
        "prefix_hit_rate": round(counted["prefix_cache_hits"] / counted["prefix_cache_queries"],
                                 3) if counted["prefix_cache_queries"] else None,
        "peak_kv_usage": round(kv_usage.peak, 3),
        "kv_cache_usage_after": usage_after(url),
    }
    problems = [] if code == 0 else [f"locust exited with {code} (failed requests?)"]

    if soak:
        is_healthy = healthy(url)
        result["healthy_after"] = is_healthy
        if not is_healthy:
            problems.append("server not healthy after the soak")
        elif result["kv_cache_usage_after"]:
            problems.append(f"{KV_USAGE} still {result['kv_cache_usage_after']} a minute "
                            "after the end")
        if sampler is not None and sampler.samples:
            first, last = sampler.first_and_last_minute_mib()
            result["rss_mib_first_minute"] = round(first, 1)
            result["rss_mib_last_minute"] = round(last, 1)
            result["rss_processes"] = sampler.samples[-1][2]
            (args.out / f"{name}_rss.csv").write_text(
                "seconds,rss_bytes,processes\n"
                + "".join(f"{t:.1f},{rss},{n}\n" for t, rss, n in sampler.samples)
            )
            if last - first > args.max_rss_growth_mib:
                problems.append(f"RSS grew {last - first:.0f} MiB (first minute {first:.0f}, "
                                f"last minute {last:.0f}; bound {args.max_rss_growth_mib})")
        else:
            result["rss_mib_first_minute"] = None
            print("RSS: not checked (give --pgid for a server this script did not start)")
        result["problems"] = problems
        for key in ("healthy_after", "kv_cache_usage_after", "rss_mib_first_minute",
                    "rss_mib_last_minute"):
            print(f"{key}: {result.get(key)}")
    (args.out / f"{name}_result.json").write_text(json.dumps(result, indent=1))
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None,
                        help="an already running server (loopback only); default: start one")
    parser.add_argument("--duration", type=int, default=60, help="seconds (default 60)")
    parser.add_argument("--users", type=int, default=4, help=f"at most {MAX_USERS} (default 4)")
    parser.add_argument("--spawn-rate", type=float, default=1.0, help="users started per second")
    parser.add_argument("--profile", choices=PROFILES, default="short")
    parser.add_argument("--policy", default="none",
                        help="--kv-policy of the server started here (label only with --url)")
    parser.add_argument("--kv-budgets", default="",
                        help="per-request budgets, e.g. 0.1,0.25,0.5 (each request picks one)")
    parser.add_argument("--soak-minutes", type=float, default=None,
                        help="soak for this long, then check health, KV usage and RSS")
    parser.add_argument("--max-rss-growth-mib", type=float, default=256,
                        help="soak: allowed RSS growth, first to last minute (default 256)")
    parser.add_argument("--pgid", type=int, default=None,
                        help="soak with --url: the server's process group, for the RSS check")
    parser.add_argument("--port", type=int, default=None, help="port of the server started here")
    parser.add_argument("--kv-cache-gib", default=None, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--out", type=Path, default=REPORTS)
    parser.add_argument("--name", default=None, help="report file prefix")
    parser.add_argument("--locust-args", default="", help="extra locust flags, one string")
    args, vllm_args = parser.parse_known_args(argv)
    args.vllm_args = [a for a in vllm_args if a != "--"]
    if not 1 <= args.users <= MAX_USERS:
        parser.error(f"--users must be in 1..{MAX_USERS}")
    duration = args.soak_minutes * 60 if args.soak_minutes is not None else args.duration
    if not 1 <= duration <= MAX_DURATION_S:
        parser.error(f"the run must last 1 s .. {MAX_DURATION_S} s")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        if args.vllm_args:
            raise SystemExit(f"vllm flags {args.vllm_args} given with --url: nothing to start")
        return run(args, check_local(args.url), args.pgid)
    server = VllmServer(
        args.out / f"server-{args.policy}.log",
        port=args.port or free_port(),
        policy=args.policy,
        extra_args=args.vllm_args,
        kv_cache_gib=args.kv_cache_gib,
    )
    print("+ " + " ".join(server.command), file=sys.stderr, flush=True)
    with server:
        assert server.process is not None
        # start_new_session=True: the server's pid is its process group id.
        return run(args, server.url, server.process.pid)


if __name__ == "__main__":
    sys.exit(main())
