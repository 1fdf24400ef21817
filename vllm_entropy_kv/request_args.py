"""Per-request KV policy settings: validated in the API server, before the engine sees them.

A request chooses its own policy and budget through vLLM's extra request arguments, the
OpenAI body field `vllm_xargs` (which becomes `SamplingParams.extra_args`):

    {"model": ..., "prompt": ..., "vllm_xargs": {"kv_policy": "snapkv", "kv_budget": 0.5}}

Keys are the `--kv-*` flags with underscores (`kv_policy`, `kv_budget`, `kv_sink_tokens`,
`kv_recent_tokens`, `kv_window`, `kv_merge_bias`, and the policy parameters `kv_reach`,
`kv_chunk_size`, `kv_exponent`, `kv_summary_fraction`, `kv_query_reduce`:
`KVPolicyConfig.field_names()`); the
server's flags are the defaults for the keys a request leaves out. The worker applies them (`CompressionWorker.request_config`). Invalid settings are
answered here with HTTP 400 whose `param` names the field, e.g. `vllm_xargs.kv_budget`:
vLLM itself passes unknown extra args through untouched, and an error inside the engine
would fail a whole batch instead of one request.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from vllm_entropy_kv.config import REQUEST_ARGS_FIELD, KVPolicyConfig, KVPolicyConfigError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The generation routes whose bodies carry `vllm_xargs`.
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})


def request_error(body: bytes, server: KVPolicyConfig) -> KVPolicyConfigError | None:
    """The error of a request body's KV settings, or None if they are valid or absent.

    Bodies that are not JSON objects are left to vLLM, which answers them with its own 400.
    """
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    extra_args = payload.get(REQUEST_ARGS_FIELD)
    if not isinstance(extra_args, dict):
        return None
    try:
        server.for_request(extra_args)
    except KVPolicyConfigError as e:
        return e
    return None


def error_body(error: KVPolicyConfigError) -> bytes:
    """vLLM's OpenAI error shape (`ErrorResponse`), `param` naming the request field."""
    param = f"{REQUEST_ARGS_FIELD}.{error.field}" if error.field else REQUEST_ARGS_FIELD
    return json.dumps({
        "error": {
            "message": f"invalid {REQUEST_ARGS_FIELD}: {error}",
            "type": "BadRequestError",
            "param": param,
            "code": 400,
        }
    }).encode()


class RequestArgsValidator:
    """ASGI middleware: answers generation requests with invalid KV settings with 400.

    It reads the whole body (the routes need it anyway), checks it, and replays it to the
    app unchanged. `server_config` returns the server's settings once the app knows them.
    """

    def __init__(self, app: ASGIApp, server_config: Callable[[Scope], KVPolicyConfig | None]):
        self.app = app
        self.server_config = server_config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or scope.get("path") not in GENERATION_PATHS):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        server = self.server_config(scope)
        error = request_error(body, server) if server is not None else None
        if error is not None:
            await _send_json(send, 400, error_body(error))
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})
