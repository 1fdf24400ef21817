"""End to end: a real `vllm serve` with the plugin loaded, spoken to over HTTP."""

from __future__ import annotations

import subprocess

import pytest
import requests
from openai import OpenAI

from vllm_entropy_kv.assets import SERVED_MODEL_NAME
from vllm_entropy_kv.config import SERVED_POLICIES
from vllm_entropy_kv.launch import VllmServer, serve_command, serve_environment

pytestmark = pytest.mark.server


def client(server: VllmServer) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120)


# A 135M model's greedy answer to one question can flip with the attention kernel's rounding:
# on an Intel Xeon with AMX (2026-12-05) stock vLLM 0.32 at its default bfloat16 answers
# France with "L'Étoile, la Marseillaise, ..." (its AMX attention kernel; the vec kernel and
# float32 say Paris), and float32 misses Italy; perplexity on 1,748 tokens of text is the same
# for all three (25.95, 25.95, 25.92). So the smoke test asks four questions, not one.
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Japan": "Tokyo"}


def test_greedy_chat_names_capitals(server: VllmServer) -> None:
    answers = {
        country: client(server).chat.completions.create(
            model=SERVED_MODEL_NAME,
            messages=[{"role": "user", "content": f"What is the capital of {country}?"}],
            temperature=0,
            max_tokens=20,
        ).choices[0].message.content
        for country in CAPITALS
    }
    right = [c for c, answer in answers.items() if CAPITALS[c] in answer]
    assert len(right) >= 3, answers


def test_streamed_completion_arrives_in_chunks_and_ends(server: VllmServer) -> None:
    stream = client(server).completions.create(
        model=SERVED_MODEL_NAME,
        prompt="Once upon a time",
        temperature=0,
        max_tokens=24,
        stream=True,
    )
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert sum(1 for t in texts if t) > 1
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_metrics_endpoint_serves_vllm_metrics(server: VllmServer) -> None:
    body = requests.get(server.url + "/metrics", timeout=10).text
    for name in ("vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds"):
        assert name in body


def _run_serve(args: list[str]) -> subprocess.CompletedProcess[str]:
    command = serve_command(port=1, extra_args=args)
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=serve_environment())


def test_unknown_policy_stops_startup_naming_valid_policies() -> None:
    result = _run_serve(["--kv-policy", "bogus"])
    assert result.returncode != 0
    assert "--kv-policy" in result.stderr
    for name in SERVED_POLICIES:
        assert f"'{name}'" in result.stderr


def test_unknown_policy_in_additional_config_stops_startup() -> None:
    result = _run_serve(["--additional-config.kv_policy", "bogus"])
    assert result.returncode != 0
    assert "kv_policy: unknown or unsupported policy 'bogus'" in result.stderr


def test_out_of_range_budget_stops_startup() -> None:
    result = _run_serve(["--kv-budget", "-1"])
    assert result.returncode != 0
    assert "kv_budget" in result.stderr and "(0, 1]" in result.stderr


def test_help_lists_the_kv_flags() -> None:
    result = subprocess.run(serve_command()[:2] + ["--help=KVCompressionConfig"],
                            capture_output=True, text=True, timeout=300)
    for flag in ("--kv-policy", "--kv-budget", "--kv-sink-tokens", "--kv-recent-tokens"):
        assert flag in result.stdout
