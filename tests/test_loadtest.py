"""A short real locust run (loadtests/run.py, headless, 2 users, `short` profile) against the
session's real `vllm serve`: the CSV report has requests, no failures, and the streamed
requests' TTFT entries."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_entropy_kv.launch import VllmServer

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "loadtests" / "run.py"
DURATION_S = 30


def test_short_locust_run_has_requests_no_failures_and_ttft(
    server: VllmServer, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, str(RUN), "--url", server.url, "--duration", str(DURATION_S),
         "--users", "2", "--spawn-rate", "2", "--profile", "short", "--policy", "none",
         "--out", str(tmp_path), "--name", "short"],
        capture_output=True, text=True, cwd=ROOT, check=False,
        timeout=DURATION_S + 300,  # run time, users' last requests, start-up
    )
    output = result.stdout + result.stderr[-4000:]
    assert result.returncode == 0, output

    stats = tmp_path / "short_stats.csv"
    assert stats.exists(), output
    assert (tmp_path / "short.html").exists()
    with stats.open(newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}

    http = {name: row for name, row in rows.items() if row["Type"] == "POST"}
    assert sum(int(row["Request Count"]) for row in http.values()) > 0, output
    assert all(int(row["Failure Count"]) == 0 for row in rows.values()), output

    ttft = {name: row for name, row in rows.items() if name.startswith("TTFT ")}
    assert ttft, f"no TTFT entries in {sorted(rows)}"
    for name, row in ttft.items():
        assert row["Type"] == "METRIC"
        assert int(row["Request Count"]) > 0
        # One TTFT per streamed request that completed (`TTFT chat-stream` <- `chat-stream`).
        assert name.removeprefix("TTFT ") in http, name
        assert 0 < float(row["Median Response Time"]) <= float(
            http[name.removeprefix("TTFT ")]["Max Response Time"]
        )
