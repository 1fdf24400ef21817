"""Real `vllm serve` processes for the tests, each started on first use and shared.

Servers are module-scoped where only one module needs them, so no more than a few run at
once on a 24 GiB machine; the `none` server is shared by the whole session.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from servers import SAME_SCHEDULING, start_server

from vllm_entropy_kv.launch import VllmServer


@pytest.fixture(scope="session")
def server() -> Iterator[VllmServer]:
    """The plugin loaded with `--kv-policy none` (stock vLLM behaviour)."""
    srv = start_server("none", "none", SAME_SCHEDULING)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def entropy_server() -> Iterator[VllmServer]:
    """`--kv-policy entropy --kv-budget 0.25`."""
    srv = start_server("entropy", "entropy", ["--kv-budget", "0.25"])
    yield srv
    srv.stop()
