"""Shared fixtures: one real `vllm serve` per test session, started on first use."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_entropy_kv.launch import VllmServer

LOG_DIR = Path(__file__).resolve().parent.parent / "reports" / "test-logs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server() -> Iterator[VllmServer]:
    """The plugin loaded with `--kv-policy none` (stock vLLM behaviour)."""
    with VllmServer(LOG_DIR / "server-none.log", port=free_port(), policy="none") as srv:
        yield srv
