"""Compression with vLLM's own scheduling left as vLLM sets it: chunked prefill (512-token
chunks against prompts of up to 1.9k tokens), and async scheduling, which vLLM's CPU platform
turns off (docs/ENGINE.md argues the ordering with it on), on real servers.

These servers run float32 whatever the CPU's fast dtype: the plan comparison needs a prompt
computed in chunks to give bit-identical queries to one computed at once, which bf16's
rounding does not promise (measured: identical kept indices in float32, a few different
ones in bf16 at 3k tokens), and concurrent and one-at-a-time decoding are compared token for
token.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import complete, compressed, plan_of, prompt_of_words, wait_for_idle_cache
from servers import start_server

from vllm_entropy_kv.engine.worker import CHECK_BLOCKS_ENV
from vllm_entropy_kv.launch import VllmServer, metric
from vllm_entropy_kv.metrics import MetricName

pytestmark = pytest.mark.server

CHUNK = 512
FLOAT32 = ["--dtype", "float32"]
ENTROPY = ["--kv-budget", "0.25", *FLOAT32]
# ~1.4k tokens: three chunks of 512 on the chunked server, one step on the default one
# (max_num_batched_tokens 2048 on CPU).
PLAN_PROMPT = prompt_of_words(1050, 12000)


@pytest.fixture(scope="module")
def chunked_server() -> Iterator[VllmServer]:
    """Entropy at 0.25, vLLM's chunked prefill in 512-token chunks, a pool of 65 blocks per
    layer: 2k tokens of full KV and vLLM's null block."""
    srv = start_server("chunked-entropy", "entropy", [
        *ENTROPY, "--max-num-batched-tokens", str(CHUNK), "--max-model-len", "2048",
        "--num-gpu-blocks-override", str(65 * 30),
    ], extra_env={CHECK_BLOCKS_ENV: "1"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def whole_prompt_server() -> Iterator[VllmServer]:
    """Entropy at 0.25 with vLLM's default step budget: PLAN_PROMPT in one step."""
    srv = start_server("whole-entropy", "entropy", ENTROPY)
    yield srv
    srv.stop()


def test_the_plugin_leaves_vllms_scheduling_and_prefix_caching_alone(
    chunked_server: VllmServer,
) -> None:
    log = chunked_server.log_path.read_text(errors="replace")
    assert "enable_chunked_prefill=True" in log and "enable_prefix_caching=True" in log
    changed = [line for line in log.splitlines() if line.startswith("vllm-entropy-kv: ")]
    assert changed and not [line for line in changed if any(
        name in line for name in ("chunked", "async", "max_num_batched_tokens", "prefix"))
    ], changed


def test_keep_all_in_chunks_is_token_identical_to_none(chunked_server: VllmServer) -> None:
    """Budget 1.0 through the real compaction path (keys read back from the cache after the
    last chunk, copied into fresh blocks) decodes what the uncompressed cache decodes."""
    url = chunked_server.url
    before = metric(url, MetricName.REQUESTS)
    prompts = [prompt_of_words(40), prompt_of_words(800, 3000), PLAN_PROMPT]
    for prompt in prompts:
        keep_all = complete(url, prompt, max_tokens=32, ignore_eos=True,
                            vllm_xargs={"kv_budget": 1.0})
        none = complete(url, prompt, max_tokens=32, ignore_eos=True,
                        vllm_xargs={"kv_policy": "none"})
        assert keep_all["choices"][0]["text"] == none["choices"][0]["text"]
        assert keep_all["usage"]["prompt_tokens"] <= 2048 - 32
    assert metric(url, MetricName.REQUESTS) - before == 2  # the short prompt is left alone


def test_a_plan_made_in_chunks_equals_the_plan_made_at_once(
    chunked_server: VllmServer, whole_prompt_server: VllmServer
) -> None:
    plans = []
    for srv in (chunked_server, whole_prompt_server):
        tokens, plan = plan_of(srv.url, PLAN_PROMPT)
        assert CHUNK < tokens <= 2048 - 32 and compressed(tokens)
        plans.append(plan)
    chunked, whole = plans
    print(f"plan of a {chunked['prompt_tokens']}-token prompt: in chunks of {CHUNK} "
          f"{chunked['plan_digest']}, at once {whole['plan_digest']}")
    assert chunked["prompt_tokens"] == whole["prompt_tokens"]
    assert chunked["plan_digest"] == whole["plan_digest"]
    assert chunked["layer_budget_ratio"] == whole["layer_budget_ratio"]


# 16 prompts of ~200-650 tokens, 112 tokens decoded each: compressed, a request still grows
# to 5-9 blocks per layer, so the 65-block pool holds about 9 at once and the scheduler,
# which admits requests while their next chunk fits, must preempt as they decode (2
# preemptions on an AMD EPYC, 2026-12-07; 160 tokens gave 4 on an Intel Xeon, for 90 s more).
CONCURRENT_WORDS = [150, 500, 300, 450, 200, 400, 350, 250] * 2
DECODE = 112


def test_concurrent_requests_with_preemption_decode_what_they_decode_alone(
    chunked_server: VllmServer,
) -> None:
    """Sixteen requests at once in a pool that cannot hold them (compression frees blocks
    while others prefill in chunks, the scheduler hands them on, decode runs out and
    preempts), then the same requests one at a time. The server checks every step that no
    KV block is read by two requests or layers (`CHECK_BLOCKS_ENV`; it would stop the
    engine), and the texts are the same except where a preemption made a difference: a
    request recomputed after preemption is compressed again as the first time, but the KV
    of its outputs so far is recomputed over the whole prompt (before, they were decoded over
    the compressed one), so its continuation may change. With `none`, concurrent and
    one-at-a-time texts are identical on this server (float32), preemptions included."""
    url = chunked_server.url
    prompts = [prompt_of_words(w, 500 * i) for i, w in enumerate(CONCURRENT_WORDS)]

    def run(prompt: str) -> str:
        return complete(url, prompt, max_tokens=DECODE, ignore_eos=True)["choices"][0]["text"]

    preempted_before = metric(url, "vllm:num_preemptions_total")
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        together = list(pool.map(run, prompts))
    preemptions = metric(url, "vllm:num_preemptions_total") - preempted_before
    alone = [run(prompt) for prompt in prompts]
    differ = [i for i, (a, b) in enumerate(zip(together, alone)) if a != b]
    print(f"{len(prompts)} requests, {preemptions:.0f} preemptions; differ: {differ}")
    assert preemptions >= 1
    assert len(differ) <= preemptions, [(together[i], alone[i]) for i in differ]
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert wait_for_idle_cache(url) == 0

