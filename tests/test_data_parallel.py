"""Data parallelism on a real server: `--data-parallel-size 2` runs two engines, each with its
own scheduler, worker and KV pool, and vLLM then starts one API server process per engine.
Compression stays inside an engine, so nothing has to agree across them; what must hold is
that both engines compress, that nothing leaks, and that `GET /v1/kv-policy`, answered by
whichever API server process takes the request, reports the totals of all of them (the sum
`/metrics` shows), not its own share.

float32 and one core per engine (`VLLM_CPU_OMP_THREADS_BIND`), as for tensor parallelism.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import complete, prompt_of_words, wait_for_idle_cache, wait_for_own_counter
from servers import start_server

from vllm_entropy_kv.launch import VllmServer, metric
from vllm_entropy_kv.metrics import MetricName

pytestmark = pytest.mark.server

REQUESTS = 6


@pytest.fixture(scope="module")
def dp_server() -> Iterator[VllmServer]:
    srv = start_server("dp2-entropy", "entropy", [
        "--data-parallel-size", "2", "--kv-budget", "0.25", "--dtype", "float32",
        "--max-model-len", "4096",
    ], extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    yield srv
    srv.stop()


def test_both_engines_compress_and_the_endpoint_sums_them(dp_server: VllmServer) -> None:
    url = dp_server.url
    prompts = [prompt_of_words(700, 30000 + 977 * i) for i in range(REQUESTS)]
    with ThreadPoolExecutor(max_workers=REQUESTS) as pool:
        replies = list(pool.map(lambda p: complete(url, p, max_tokens=8, ignore_eos=True),
                                prompts))
    assert all(reply["usage"]["completion_tokens"] == 8 for reply in replies)
    wait_for_own_counter(url, MetricName.REQUESTS, REQUESTS)

    per_engine = {engine: metric(url, MetricName.REQUESTS, f'engine="{engine}"')
                  for engine in ("0", "1")}
    freed = metric(url, MetricName.FREED_BLOCKS, 'policy="entropy"')
    print(f"requests compressed per engine: {per_engine}; freed blocks {freed:.0f}")
    assert sum(per_engine.values()) == REQUESTS
    assert all(count > 0 for count in per_engine.values()), per_engine
    # Each request may land on either API server process: all of them must answer the sum.
    for _ in range(4):
        totals = requests.get(f"{url}/v1/kv-policy", timeout=30).json()["totals"]
        assert totals["requests_compressed"] == REQUESTS
        assert totals["freed_blocks"] == freed > 0
    assert wait_for_idle_cache(url) == 0
