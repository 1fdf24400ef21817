"""Per-request KV settings (`vllm_xargs`): the merge rule and the API server's 400, without
vLLM (the ASGI middleware runs against a stand-in app that records what reached it)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from vllm_entropy_kv.config import KVPolicyConfig, KVPolicyConfigError
from vllm_entropy_kv.request_args import RequestArgsValidator, request_error

SERVER = KVPolicyConfig(policy="entropy", budget=0.25)


def test_request_settings_override_the_server_and_others_are_ignored() -> None:
    config = SERVER.for_request({"kv_policy": "snapkv", "kv_budget": "0.5", "session_id": 3})
    assert (config.policy, config.budget) == ("snapkv", 0.5)
    assert config.recent_tokens == SERVER.recent_tokens
    assert SERVER.for_request(None) is SERVER and SERVER.for_request({"top": 1}) is SERVER


@pytest.mark.parametrize(("extra_args", "field"), [
    ({"kv_budget": 2.5}, "kv_budget"),
    ({"kv_budget": "lots"}, "kv_budget"),
    ({"kv_policy": "bogus"}, "kv_policy"),
    ({"kv_window": 0}, "kv_window"),
    ({"kv_budjet": 0.5}, "kv_budjet"),
    ({"kv_reach": 0}, "kv_reach"),
    ({"kv_chunk_size": "big"}, "kv_chunk_size"),
    ({"kv_exponent": -2}, "kv_exponent"),
    ({"kv_summary_fraction": 1.5}, "kv_summary_fraction"),
])
def test_invalid_request_settings_name_their_field(extra_args: dict, field: str) -> None:
    with pytest.raises(KVPolicyConfigError) as err:
        SERVER.for_request(extra_args)
    assert err.value.field == field


def test_request_policy_parameters_reach_the_policy_it_plans_with() -> None:
    config = SERVER.for_request({"kv_policy": "entropy-merge", "kv_reach": "1",
                                 "kv_chunk_size": 8, "kv_exponent": 0, "kv_window": 24,
                                 "kv_summary_fraction": 0.3})
    policy = config.make_policy()
    assert (policy.reach, policy.chunk_size, policy.exponent, policy.observation_queries,
            policy.summary_fraction) == (1, 8, 0.0, 24, 0.3)
    # Left out, they are the server's.
    assert SERVER.for_request({"kv_budget": 0.5}).make_policy().reach == SERVER.reach


def test_a_request_choosing_another_policy_gets_that_policys_window() -> None:
    assert SERVER.window == 32  # the server's window for entropy
    assert SERVER.for_request({"kv_policy": "snapkv"}).window == 32
    # A window the server was given explicitly is the default for every policy.
    server = KVPolicyConfig(policy="entropy", window=24)
    assert server.for_request({"kv_policy": "snapkv"}).window == 24
    assert server.for_request({"kv_window": 40}).make_policy().observation_queries == 40


def test_a_request_cannot_turn_compression_on_in_a_none_server() -> None:
    server = KVPolicyConfig()
    assert server.for_request({"kv_policy": "none", "kv_budget": 0.5}).budget == 0.5
    with pytest.raises(KVPolicyConfigError, match="--kv-policy none") as err:
        server.for_request({"kv_policy": "entropy"})
    assert err.value.field == "kv_policy"


def test_bodies_that_are_not_ours_to_judge_pass() -> None:
    for body in (b"{not json", b"[1, 2]", b'{"prompt": "x"}', b'{"vllm_xargs": "text"}',
                 b"\xff\xfe"):
        assert request_error(body, SERVER) is None


def run(path: str, body: bytes, chunks: int = 1) -> tuple[list[dict[str, Any]], bytes | None]:
    """Send `body` (in `chunks` pieces) through the middleware; returns what was sent back
    and the body the app received (None if it was not called)."""
    received: list[bytes] = []

    async def app(scope, receive, send) -> None:
        data = b""
        while True:
            message = await receive()
            data += message.get("body", b"")
            if not message.get("more_body"):
                break
        received.append(data)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    size = max(1, -(-len(body) // chunks))
    pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    incoming = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
                for i, p in enumerate(pieces)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    middleware = RequestArgsValidator(app, lambda scope: SERVER)
    asyncio.run(middleware({"type": "http", "method": "POST", "path": path}, receive, send))
    return sent, received[0] if received else None


def test_invalid_budget_gets_400_naming_the_field() -> None:
    body = json.dumps({"prompt": "hi", "vllm_xargs": {"kv_budget": 7.5}}).encode()
    sent, reached = run("/v1/completions", body)
    assert reached is None
    assert sent[0]["status"] == 400
    error = json.loads(sent[1]["body"])["error"]
    assert error["param"] == "vllm_xargs.kv_budget" and error["code"] == 400
    assert "kv_budget" in error["message"] and "(0, 1]" in error["message"]


def test_invalid_policy_parameter_gets_400_naming_the_field() -> None:
    body = json.dumps({"prompt": "hi", "vllm_xargs": {"kv_summary_fraction": 2}}).encode()
    sent, reached = run("/v1/completions", body)
    assert reached is None and sent[0]["status"] == 400
    error = json.loads(sent[1]["body"])["error"]
    assert error["param"] == "vllm_xargs.kv_summary_fraction"
    assert "[0, 1]" in error["message"]


def test_valid_body_reaches_the_app_unchanged_even_in_pieces() -> None:
    body = json.dumps({"messages": [], "vllm_xargs": {"kv_policy": "streaming"}}).encode()
    sent, reached = run("/v1/chat/completions", body, chunks=3)
    assert reached == body and sent[0]["status"] == 200


def test_other_routes_are_not_read() -> None:
    body = json.dumps({"vllm_xargs": {"kv_budget": 7.5}}).encode()
    sent, reached = run("/tokenize", body)
    assert reached == body and sent[0]["status"] == 200
