"""Tensor parallelism on a real server: `-tp 3` splits the embedded model's 3 KV heads (9
query heads) one per rank. Every rank must keep the same tokens (each plans from its own
heads and the statistics the ranks exchange, policies/shards.py; the connector stops the
engine if two ranks' reports ever differ), the plan must be the TP=1 plan, and concurrency,
aborts and preemption must neither leak nor read a freed block.

Both servers run float32 (bf16 gave a nonsense answer at TP=3 in a quick try, and the plan
comparison wants one dtype) and check block ownership every step (`CHECK_BLOCKS_ENV`). The
ranks share this machine's cores: `VLLM_CPU_OMP_THREADS_BIND` gives each one of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import complete, compressed, plan_of, prompt_of_words, wait_for_idle_cache
from servers import start_server

from vllm_entropy_kv.assets import SERVED_MODEL_NAME
from vllm_entropy_kv.engine.worker import CHECK_BLOCKS_ENV
from vllm_entropy_kv.eval.server_needle import run_server_needle
from vllm_entropy_kv.launch import VllmServer, metric

pytestmark = pytest.mark.server

# 100 blocks per layer (3,200 tokens of full KV) and vLLM's null block: a 3k-token needle
# fits; two 1,560-token prompts kept whole nearly fill it (the concurrency test).
POOL = ["--num-gpu-blocks-override", str(101 * 30), "--max-model-len", "3200"]
ENTROPY = ["--kv-budget", "0.25", "--dtype", "float32", *POOL]
PLAN_PROMPT = prompt_of_words(1050, 12000)


@pytest.fixture(scope="module")
def tp_server() -> Iterator[VllmServer]:
    srv = start_server("tp3-entropy", "entropy", ["-tp", "3", *ENTROPY], extra_env={
        CHECK_BLOCKS_ENV: "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1|0"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tp1_server() -> Iterator[VllmServer]:
    srv = start_server("tp1-entropy", "entropy", ENTROPY, extra_env={CHECK_BLOCKS_ENV: "1"})
    yield srv
    srv.stop()


def test_every_rank_keeps_the_tp1_plan(tp_server: VllmServer, tp1_server: VllmServer) -> None:
    """The ranks' reports agree (else the engine would have stopped: the server answers
    below), and their plan is the plan of the same prompt at TP=1."""
    plans = []
    for srv in (tp_server, tp1_server):
        tokens, plan = plan_of(srv.url, PLAN_PROMPT)
        assert compressed(tokens)
        plans.append(plan)
    tp3, tp1 = plans
    print(f"plan of a {tp1['prompt_tokens']}-token prompt: TP=3 {tp3['plan_digest']}, "
          f"TP=1 {tp1['plan_digest']}")
    assert tp3["prompt_tokens"] == tp1["prompt_tokens"]
    assert tp3["layer_budget_ratio"] == tp1["layer_budget_ratio"]
    assert tp3["plan_digest"] == tp1["plan_digest"]
    assert requests.get(f"{tp_server.url}/health", timeout=10).status_code == 200


def test_needle_retrieval_at_tp3_matches_tp1(tp_server: VllmServer,
                                             tp1_server: VllmServer) -> None:
    depths = [0.3, 0.7]
    tp3 = run_server_needle(tp_server.url, [3000], depths)
    tp1 = run_server_needle(tp1_server.url, [3000], depths)
    print(f"needle 3000 tokens at {depths}: TP=3 {[r.hit for r in tp3]}, "
          f"TP=1 {[r.hit for r in tp1]}")
    assert [r.hit for r in tp3] == [r.hit for r in tp1]


# Decoding at TP=3 on 2 cores runs at about 4 tokens/s, so the requests are few and short.
# Two 1,560-token prompts kept whole (49 blocks per layer each) fill 98 of the pool's 100
# blocks per layer, and nothing else fits beside them: by their 41st decoded token they need
# two more blocks per layer than the pool has, so the scheduler must preempt one. The
# compressed requests and the aborted ones arrive once both run; they decode fewer tokens,
# since the preemption comes from the long ones and each request also runs alone.
FULL = [(1210, 40000), (1260, 43000)]  # (words, offset): 1,560 tokens each
FULL_TOKENS = range(48 * 32 + 1, 49 * 32 + 1)
COMPRESSED_WORDS = [1000, 700, 900, 800, 600] * 2
DECODE = {1.0: 64, 0.25: 24}  # tokens decoded, by budget


def test_concurrent_aborted_and_preempted_requests_at_tp3(tp_server: VllmServer) -> None:
    """Sixteen concurrent requests: two that keep their whole prompts fill the pool and one
    is preempted as they decode; ten compressed requests and four aborted ones arrive
    meanwhile; then the same twelve requests one at a time. Outputs differ only where a
    preemption made a difference (tests/test_scheduling.py says why), no step reads a
    freed block (the server checks), nothing leaks."""
    url = tp_server.url
    full = [prompt_of_words(w, offset) for w, offset in FULL]
    for prompt in full:
        tokens = requests.post(f"{url}/tokenize", timeout=30, json={
            "model": SERVED_MODEL_NAME, "prompt": prompt}).json()["count"]
        assert tokens in FULL_TOKENS, f"{tokens} tokens: the pool arithmetic above is off"
    budgets = {p: 1.0 for p in full}
    budgets |= {prompt_of_words(w, 700 * i): 0.25 for i, w in enumerate(COMPRESSED_WORDS)}
    prompts = list(budgets)

    def run(prompt: str) -> str:
        return complete(url, prompt, max_tokens=DECODE[budgets[prompt]], ignore_eos=True,
                        vllm_xargs={"kv_budget": budgets[prompt]})["choices"][0]["text"]

    def aborted(prompt: str) -> None:
        # The client gives up; vLLM aborts the request and frees its blocks (or drops it
        # from the waiting queue).
        with pytest.raises(requests.exceptions.Timeout):
            requests.post(f"{url}/v1/completions", timeout=3, json={
                "model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": 500,
                "ignore_eos": True})

    preempted_before = metric(url, "vllm:num_preemptions_total")
    with ThreadPoolExecutor(max_workers=len(prompts) + 4) as pool:
        first = [pool.submit(run, prompt) for prompt in full]
        deadline = time.monotonic() + 120
        while metric(url, "vllm:num_requests_running") < 2:
            assert time.monotonic() < deadline, "the two long requests never ran together"
            time.sleep(0.2)
        aborts = [pool.submit(aborted, prompt_of_words(1500, 30000 + 2000 * i))
                  for i in range(4)]
        rest = list(pool.map(run, prompts[len(full):]))
        together = [f.result() for f in first] + rest
        for abort in aborts:
            abort.result()
    preemptions = metric(url, "vllm:num_preemptions_total") - preempted_before
    alone = [run(prompt) for prompt in prompts]
    differ = [i for i, (a, b) in enumerate(zip(together, alone)) if a != b]
    print(f"{len(prompts)} requests and 4 aborted, {preemptions:.0f} preemptions; "
          f"differ: {differ}")
    assert preemptions >= 1
    assert len(differ) <= preemptions, [(together[i], alone[i]) for i in differ]
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert wait_for_idle_cache(url) == 0
