"""Faults and bad input against a real server with compression on: every failure is a 4xx
with a message, the server stays up, and no KV block stays in use afterwards."""

from __future__ import annotations

import json

import pytest
import requests
from helpers import complete, metric, prompt_of_words, wait_for_idle_cache
from servers import MAX_MODEL_LEN

from vllm_entropy_kv.assets import SERVED_MODEL_NAME
from vllm_entropy_kv.launch import VllmServer

pytestmark = pytest.mark.server

LONG_PROMPT = prompt_of_words(2400, 3000)  # ~3k tokens: compressed at 0.25


def post(url: str, path: str, body: dict | bytes, timeout: float = 600) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{url}{path}", data=data, timeout=timeout,
                         headers={"Content-Type": "application/json"})


def assert_client_error(response: requests.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"], error
    return error


def assert_still_serving(url: str) -> None:
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert wait_for_idle_cache(url) == 0
    answer = complete(url, "The capital of France is", max_tokens=4, ignore_eos=True)
    assert answer["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("body", [b'{"model": "x", "prompt": ', b"not json at all", b"[]"])
def test_malformed_json_is_a_400(entropy_server: VllmServer, body: bytes) -> None:
    assert_client_error(post(entropy_server.url, "/v1/completions", body))
    assert_client_error(post(entropy_server.url, "/v1/chat/completions", body))


def test_prompt_longer_than_the_model_allows_is_a_400(entropy_server: VllmServer) -> None:
    prompt = prompt_of_words(MAX_MODEL_LEN * 2)
    error = assert_client_error(post(entropy_server.url, "/v1/completions", {
        "model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": 8,
    }))
    assert "context length" in error["message"] or "too long" in error["message"], error


@pytest.mark.parametrize(("xargs", "field"), [
    ({"kv_budget": 1.5}, "kv_budget"),
    ({"kv_budget": -1}, "kv_budget"),
    ({"kv_budget": "half"}, "kv_budget"),
    ({"kv_policy": "magic"}, "kv_policy"),
    ({"kv_policy": "h2o"}, "kv_policy"),  # offline evaluation only
    ({"kv_window": 0}, "kv_window"),
    ({"kv_reach": 0}, "kv_reach"),  # a policy parameter
    ({"kv_bugdet": 0.5}, "kv_bugdet"),
])
def test_invalid_per_request_settings_are_a_400_naming_the_field(
    entropy_server: VllmServer, xargs: dict, field: str
) -> None:
    completion = {"model": SERVED_MODEL_NAME, "prompt": "Hello", "max_tokens": 4}
    chat = {"model": SERVED_MODEL_NAME, "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hello"}]}
    for path, body in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
        error = assert_client_error(post(entropy_server.url, path, {**body, "vllm_xargs": xargs}))
        assert error["param"] == f"vllm_xargs.{field}", error
        assert field in error["message"], error
    if field == "kv_policy":
        assert "entropy" in error["message"] and "snapkv" in error["message"], error


def test_compression_cannot_be_requested_from_a_none_server(server: VllmServer) -> None:
    error = assert_client_error(post(server.url, "/v1/completions", {
        "model": SERVED_MODEL_NAME, "prompt": "Hello", "max_tokens": 4,
        "vllm_xargs": {"kv_policy": "entropy"},
    }))
    assert error["param"] == "vllm_xargs.kv_policy" and "--kv-policy none" in error["message"]


def test_unknown_model_and_bad_sampling_values_are_4xx(entropy_server: VllmServer) -> None:
    url = entropy_server.url
    assert_client_error(post(url, "/v1/completions", {
        "model": "no-such-model", "prompt": "Hello", "max_tokens": 4}), status=404)
    assert_client_error(post(url, "/v1/completions", {
        "model": SERVED_MODEL_NAME, "prompt": "Hello", "max_tokens": -3}))
    assert_client_error(post(url, "/v1/completions", {
        "model": SERVED_MODEL_NAME, "prompt": "Hello", "temperature": "hot"}))


def test_clients_that_disconnect_mid_stream_leave_nothing_behind(
    entropy_server: VllmServer,
) -> None:
    url = entropy_server.url
    compressed_before = metric(url, "vllm_entropy_kv_requests_compressed_total")
    for after_chunks in (1, 5, 20):
        with requests.post(f"{url}/v1/completions", stream=True, timeout=600, json={
            "model": SERVED_MODEL_NAME, "prompt": LONG_PROMPT, "max_tokens": 400,
            "temperature": 0, "stream": True, "ignore_eos": True,
        }) as response:
            assert response.status_code == 200
            for i, _ in enumerate(response.iter_lines()):
                if i >= after_chunks:
                    break  # closing the connection makes vLLM abort the request
    assert metric(url, "vllm_entropy_kv_requests_compressed_total") > compressed_before
    assert_still_serving(url)


def test_non_streamed_requests_whose_client_gives_up_are_aborted(
    entropy_server: VllmServer,
) -> None:
    url = entropy_server.url
    for _ in range(2):
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{url}/v1/completions", timeout=(10, 3), json={
                "model": SERVED_MODEL_NAME, "prompt": LONG_PROMPT, "max_tokens": 2000,
                "temperature": 0, "ignore_eos": True,
            })
    assert_still_serving(url)
