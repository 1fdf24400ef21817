"""Compression metrics on vLLM's `/metrics`, `GET /v1/kv-policy`, and the Grafana dashboard,
checked against a real Prometheus (Debian's `prometheus`, installed by scripts/install.sh)
scraping the shared `entropy_server` every second."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import requests
from servers import LOG_DIR
from helpers import BLOCK, LAYERS, complete, kept_blocks, metric, prompt_of_words

from vllm_entropy_kv import assets
from vllm_entropy_kv.dashboard import (
    DASHBOARD_PATH,
    Prometheus,
    dashboard_queries,
    load_dashboard,
    render,
    substitute,
)
from vllm_entropy_kv.engine.setup import COMPRESSION_BLOCK_SIZE
from vllm_entropy_kv.launch import VllmServer, default_dtype, free_port
from vllm_entropy_kv.metrics import EntropyKVStats, MetricName, build_stats

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
# Wide enough to hold all of this module's traffic on a slow, busy machine.
RATE_INTERVAL = "15m"
COUNTERS = {
    "requests": MetricName.REQUESTS,
    "prompt_tokens": MetricName.PROMPT_TOKENS,
    "kept": MetricName.TOKENS_KEPT,
    "evicted": MetricName.TOKENS_EVICTED,
    "merged": MetricName.TOKENS_MERGED,
    "blocks": MetricName.FREED_BLOCKS,
    "bytes": MetricName.FREED_BYTES,
}


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found: run scripts/install.sh as root (installs Debian's "
                    "prometheus package) or install Prometheus yourself")
    return path


# The session's entropy server also serves other policies per request (test_engine.py):
# read the series of its own policy.
OWN = 'policy="entropy"'


def counters(url: str) -> dict[str, float]:
    return {key: metric(url, name, OWN) for key, name in COUNTERS.items()}


def wait_for_counter(url: str, name: str, above: float, timeout_s: float = 60) -> float:
    """Stats reach the API server with the engine's step outputs; wait until they did."""
    deadline = time.monotonic() + timeout_s
    value = metric(url, name, OWN)
    while value <= above and time.monotonic() < deadline:
        time.sleep(0.5)
        value = metric(url, name, OWN)
    return value


def model_config() -> dict:
    return json.loads((assets.prepare_model() / "config.json").read_text())


# --- without a server ------------------------------------------------------------------------


def test_promtool_accepts_deploy_config() -> None:
    result = subprocess.run([binary("promtool"), "check", "config", str(DEPLOY_PROMETHEUS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = [title for title, _ in dashboard_queries(dashboard)]
    for wanted in ("KV cache usage", "KV bytes given back", "Compression ratio",
                   "Per-layer budget", "Time to first token", "Time per output token",
                   "Throughput", "Preemptions", "Running and waiting"):
        assert any(wanted in t for t in titles), wanted
    heatmaps = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert any("budget" in p["title"].lower() for p in heatmaps)
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "prometheus", panel["title"]
    for _, expr in dashboard_queries(dashboard):
        substitute(expr)  # no Grafana variable left but $__rate_interval


def test_stats_survive_engine_serialisation_and_aggregate() -> None:
    """Worker and scheduler stats merge; the dict crosses processes as msgpack."""
    worker = EntropyKVStats()
    worker.record_compression("entropy", 100, 96, {0: 32, 1: 64}, 0.5, {0: 0.25, 1: 0.75})
    scheduler = EntropyKVStats()
    scheduler.record_freed("entropy", 3, 3 * 32 * 768)
    merged = worker.aggregate(scheduler)
    data = msgspec.msgpack.decode(msgspec.msgpack.encode(merged.to_dict()))
    stats = build_stats(data).aggregate(build_stats(data))
    entry = stats.data["entropy"]
    # Kept per layer = planned + the 4-token tail; averaged over layers: (36 + 68) / 2.
    assert entry["requests"] == 2 and entry["prompt_tokens"] == 200
    assert entry["tokens_kept"] == 2 * 52 and entry["tokens_evicted"] == 2 * 48
    assert entry["tokens_merged"] == 0
    assert entry["freed_blocks"] == 6 and entry["freed_bytes"] == 6 * 32 * 768
    assert entry["compression_ratio"] == pytest.approx(0.52)
    assert entry["layer_budget"] == {"0": 0.36, "1": 0.68}
    assert entry["compaction_seconds"] == [0.5, 0.5]
    assert entry["layer_entropy"] == {"0": [0.25, 0.25], "1": [0.75, 0.75]}
    assert data == merged.to_dict()  # build_stats copied: the source is untouched


def test_merged_tokens_are_counted_apart_from_evicted_ones() -> None:
    stats = EntropyKVStats()
    # Two layers of 64 slots each over a 256-token prompt; layer 0's slots include 8
    # summaries standing for 100 tokens: mean merged 50, mean summary slots 4.
    stats.record_compression("entropy-merge", 256, 256, {0: 64, 1: 64}, 0.1, None,
                             {0: (8, 100)})
    entry = stats.data["entropy-merge"]
    assert entry["tokens_kept"] == 64 and entry["tokens_merged"] == 50
    assert entry["tokens_evicted"] == 256 - (64 - 4) - 50



def test_a_policy_that_merges_all_it_drops_evicts_exactly_zero() -> None:
    """30 layers whose summaries stand for every dropped token: a mean of floats put
    evicted at -2e-13 here, and the Prometheus counter's refusal took the server down."""
    slots_per_layer = [805, 1101, 286, 202, 587, 974, 1044, 506, 742, 183, 122, 381, 1035,
                       563, 919, 911, 218, 982, 362, 236, 769, 633, 936, 766, 760, 455, 217,
                       992, 258, 385]
    prompt, compressible = 2238, 2221
    summaries = {layer: (m // 10, compressible - (m - m // 10))
                 for layer, m in enumerate(slots_per_layer)}
    stats = EntropyKVStats()
    stats.record_compression("entropy-merge", prompt, compressible,
                             dict(enumerate(slots_per_layer)), 0.1, None, summaries)
    assert stats.data["entropy-merge"]["tokens_evicted"] == 0

# --- against the entropy server and a real Prometheus ---------------------------------------


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen

    @property
    def api(self) -> Prometheus:
        return Prometheus(self.url)


@pytest.fixture(scope="module")
def prometheus(entropy_server: VllmServer, tmp_path_factory) -> Iterator[PrometheusServer]:
    """A real Prometheus on a free loopback port scraping the entropy server every second."""
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: vllm-entropy-kv\n    scrape_interval: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{entropy_server.port}']\n"
    )
    port = free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = (LOG_DIR / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary("prometheus"), f"--config.file={config}",
         f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    server = PrometheusServer(f"http://127.0.0.1:{port}", process)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"prometheus exited: see {LOG_DIR}/prometheus.log"
            try:
                if requests.get(server.url + "/-/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "prometheus not ready after 60 s"
            time.sleep(0.5)
        # The target is up before the traffic, so rate() sees the counters rise.
        deadline = time.monotonic() + 60
        while not any(s["value"][1] == "1" for s in server.api.query("up")):
            assert time.monotonic() < deadline, "prometheus never scraped the entropy server"
            time.sleep(1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@dataclass
class KnownRequest:
    prompt_tokens: int
    before: dict[str, float]
    after: dict[str, float]

    def delta(self, key: str) -> float:
        return self.after[key] - self.before[key]


@pytest.fixture(scope="module")
def traffic(entropy_server: VllmServer, prometheus: PrometheusServer) -> KnownRequest:
    """One known ~2k-token request alone (counters read around it), then two more at once."""
    url = entropy_server.url
    before = counters(url)
    # ignore_eos: the request outlives its prefill, so its compacted blocks are given back
    # while it runs (a request that ends at once frees all its blocks anyway).
    reply = complete(url, prompt_of_words(1500, 500), max_tokens=16, ignore_eos=True)
    wait_for_counter(url, MetricName.REQUESTS, before["requests"])
    known = KnownRequest(reply["usage"]["prompt_tokens"], before, counters(url))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(
            lambda offset: complete(url, prompt_of_words(1400, offset), max_tokens=24,
                                    ignore_eos=True),
            (4000, 7000),
        ))
    wait_for_counter(url, MetricName.REQUESTS, known.after["requests"] + 1)
    return known


@pytest.mark.server
def test_counters_match_the_known_request(traffic: KnownRequest) -> None:
    config = model_config()
    block_size = COMPRESSION_BLOCK_SIZE  # the server runs without --block-size
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    # K and V in the served dtype: for SmolLM2-135M in float32, 3 kv heads x 64 x 2 x 4 B
    # = 1536 B per token per layer.
    element_bytes = {"float32": 4, "bfloat16": 2}[default_dtype()]
    bytes_per_token_layer = config["num_key_value_heads"] * head_dim * 2 * element_bytes
    layers = config["num_hidden_layers"]

    assert traffic.delta("requests") == 1
    assert traffic.delta("prompt_tokens") == traffic.prompt_tokens
    assert traffic.delta("merged") == 0
    evicted, kept = traffic.delta("evicted"), traffic.delta("kept")
    assert evicted == pytest.approx(traffic.prompt_tokens - kept, abs=1e-6)
    # Per layer on average: the budget's blocks of the prompt's whole blocks (the block
    # arithmetic of `kept_blocks`), plus the partial last block, which stays whole; at most
    # one block per layer more.
    tail = traffic.prompt_tokens % BLOCK
    predicted = kept_blocks(traffic.prompt_tokens) * BLOCK / LAYERS + tail
    print(f"kept {kept:.2f} of {traffic.prompt_tokens} tokens per layer, "
          f"predicted {predicted:.2f}")
    assert predicted - 1e-6 <= kept <= predicted + BLOCK
    # Every evicted token-layer was in a block that went back to the pool.
    assert traffic.delta("blocks") == pytest.approx(layers * evicted / block_size, abs=1e-6)
    assert traffic.delta("bytes") == traffic.delta("blocks") * block_size * bytes_per_token_layer


@pytest.mark.server
def test_gauges_and_histograms_on_metrics(entropy_server: VllmServer, traffic) -> None:
    url = entropy_server.url
    text = requests.get(url + "/metrics", timeout=10).text
    layers = model_config()["num_hidden_layers"]
    ratio = metric(url, MetricName.COMPRESSION_RATIO, OWN)
    assert 0 < ratio < 0.5
    budgets = [line for line in text.splitlines()
               if line.startswith(MetricName.LAYER_BUDGET + "{") and OWN in line]
    assert len(budgets) == layers
    assert sum(float(b.rsplit(" ", 1)[1]) for b in budgets) / layers == pytest.approx(ratio)
    assert metric(url, MetricName.COMPACTION_SECONDS + "_count") >= 3
    entropy_counts = [line for line in text.splitlines()
                      if line.startswith(MetricName.ENTROPY + "_count{") and OWN in line]
    assert len(entropy_counts) == layers
    assert all(float(line.rsplit(" ", 1)[1]) >= 3 for line in entropy_counts)
    assert 'policy="entropy"' in next(
        line for line in text.splitlines() if line.startswith(MetricName.INFO + "{"))
    # vLLM's own metrics are still there.
    assert metric(url, "vllm:time_to_first_token_seconds_count") >= 3
    assert "vllm:kv_cache_usage_perc{" in text


@pytest.mark.server
def test_kv_policy_endpoint(entropy_server: VllmServer, traffic) -> None:
    body = requests.get(entropy_server.url + "/v1/kv-policy", timeout=10).json()
    assert body["settings"] == {"policy": "entropy", "budget": 0.25, "sink_tokens": 4,
                                "recent_tokens": 32, "window": 32, "merge_bias": True,
                                "reach": 32, "chunk_size": 32, "exponent": 0.0,
                                "summary_fraction": 0.1, "query_reduce": "max", "enabled": True,
                                "block_size": 32}
    now = counters(entropy_server.url)
    totals = body["totals"]
    assert totals["requests_compressed"] == now["requests"]
    assert totals["tokens_evicted"] == pytest.approx(now["evicted"])
    assert totals["freed_bytes"] == now["bytes"]
    assert body["last_request"]["compression_ratio"] == pytest.approx(
        metric(entropy_server.url, MetricName.COMPRESSION_RATIO, OWN))


@pytest.mark.server
def test_every_dashboard_query_returns_data(
    entropy_server: VllmServer, prometheus: PrometheusServer, traffic, tmp_path: Path
) -> None:
    api = prometheus.api
    # Wait until Prometheus has scraped the final counter values.
    expected = metric(entropy_server.url, MetricName.REQUESTS)
    deadline = time.monotonic() + 60
    while True:
        result = api.query(f"sum({MetricName.REQUESTS})")
        if result and float(result[0]["value"][1]) == expected:
            break
        assert time.monotonic() < deadline, f"Prometheus never saw {expected} requests"
        time.sleep(1)
    time.sleep(3)  # a few more scrapes after the last change

    empty = []
    for title, expr in dashboard_queries(load_dashboard()):
        series = api.query(substitute(expr, RATE_INTERVAL))
        values = [float(s["value"][1]) for s in series]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title}: {expr} -> {series}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

    # Prometheus agrees with /metrics on the compression totals.
    for name in (MetricName.TOKENS_EVICTED, MetricName.FREED_BYTES):
        stored = float(api.query(f"sum({name})")[0]["value"][1])
        assert stored == pytest.approx(metric(entropy_server.url, name))

    # The PNG renderer draws the same panels from the same Prometheus.
    out = render(api, tmp_path / "dashboard.png", minutes=10, rate_interval="5m")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert DASHBOARD_PATH.exists()
