"""Compiled mode: a policy on a server started without `--enforce-eager` (vLLM's default,
torch.compile with Inductor; on CPU vLLM 0.32 traces the model once with Dynamo). The
launcher passes `--enforce-eager` only to save start-up time (minutes of compilation on 2
cores); the plugin sets no default of its own and works either way, because vLLM runs CPU
attention as an opaque custom op (`torch.ops.vllm.unified_attention_with_output`): the
plugin's backend, its capture and the compaction run outside the compiled graph."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from helpers import cold_salt, complete, own_counter, prompt_of_words, wait_for_own_counter
from servers import LOG_DIR, TEST_KV_GIB

from vllm_entropy_kv.launch import VllmServer, free_port
from vllm_entropy_kv.metrics import MetricName

pytestmark = pytest.mark.server

# Inductor compilation on a busy 2-core machine: about 4 minutes alone, more beside others.
STARTUP_TIMEOUT_S = 900
# Short (below the compression threshold), ~1.3k and ~2.3k tokens.
PROMPTS = [prompt_of_words(40), prompt_of_words(1000, 2000), prompt_of_words(1800, 9000)]


@pytest.fixture(scope="module")
def compiled_server() -> Iterator[VllmServer]:
    """`--kv-policy entropy --kv-budget 0.25 --no-enforce-eager` (later flags win, so this
    undoes the launcher's `--enforce-eager`)."""
    srv = VllmServer(
        LOG_DIR / "server-compiled-entropy.log", port=free_port(), policy="entropy",
        extra_args=["--kv-budget", "0.25", "--no-enforce-eager"], kv_cache_gib=TEST_KV_GIB,
        startup_timeout_s=STARTUP_TIMEOUT_S,
    )
    started = time.monotonic()
    srv.start()
    print(f"\ncompiled entropy server healthy after {time.monotonic() - started:.0f} s")
    yield srv
    srv.stop()


def test_server_really_runs_compiled(compiled_server) -> None:
    log = compiled_server.log_path.read_text(errors="replace")
    assert "enforce_eager=False" in log
    assert "CompilationMode.NONE" not in log
    assert "CompilationMode.DYNAMO_TRACE_ONCE" in log


def test_compiled_server_compresses_a_long_prompt(compiled_server) -> None:
    url = compiled_server.url
    before = {name: own_counter(url, name) for name in (
        MetricName.REQUESTS, MetricName.TOKENS_EVICTED, MetricName.FREED_BLOCKS)}
    # In bf16 the model ends this prompt's answer at once (EOS from the prefill, the blocks
    # freed with the request before the compaction report reaches the scheduler), so decode
    # on past it: the request then lives on its compacted cache and its blocks come back.
    reply = complete(url, prompt_of_words(1600, 3000), max_tokens=32, ignore_eos=True)
    assert reply["usage"]["prompt_tokens"] > 1800
    assert reply["usage"]["completion_tokens"] == 32 and reply["choices"][0]["text"].strip()
    wait_for_own_counter(url, MetricName.REQUESTS, before[MetricName.REQUESTS] + 1)
    delta = {name: own_counter(url, name) - value for name, value in before.items()}
    print(f"compiled, budget 0.25: {reply['usage']['prompt_tokens']} prompt tokens, "
          f"counters moved by {delta}, answer {reply['choices'][0]['text']!r}")
    assert delta[MetricName.REQUESTS] == 1
    assert delta[MetricName.TOKENS_EVICTED] > 0
    assert delta[MetricName.FREED_BLOCKS] > 0


def test_compiled_keep_all_budget_is_token_identical_to_none(compiled_server) -> None:
    """Budget 1.0 goes through capture, planning and the rewrite of every kept token; on the
    same compiled server its greedy text is that of policy `none`. `ignore_eos`: in bf16 the
    model stops the two long prompts at their first token, which comes from the prefill,
    before any compaction; all 48 tokens are decoded instead, 47 of them on the rewritten
    cache."""
    url = compiled_server.url
    before = own_counter(url, MetricName.REQUESTS)
    kept = [complete(url, p, max_tokens=48, ignore_eos=True, vllm_xargs={"kv_budget": 1.0},
                     cache_salt=cold_salt()) for p in PROMPTS]
    plain = [complete(url, p, max_tokens=48, ignore_eos=True, vllm_xargs={"kv_policy": "none"},
                      cache_salt=cold_salt()) for p in PROMPTS]
    print("prompt tokens:", [r["usage"]["prompt_tokens"] for r in kept])
    for reply in kept:
        print(f"  {reply['choices'][0]['text']!r}")
    assert all(r["usage"]["completion_tokens"] == 48 for r in kept + plain)
    # The two long prompts are compacted (keeping everything), the short one is left alone.
    assert wait_for_own_counter(url, MetricName.REQUESTS, before + 2) == before + 2
    assert ([r["choices"][0]["text"] for r in kept]
            == [r["choices"][0]["text"] for r in plain])
