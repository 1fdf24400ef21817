"""`GET /v1/kv-policy` on the vLLM API server: the active KV policy settings and live totals;
and the check of per-request KV settings (`vllm_entropy_kv.request_args`).

A `vllm.endpoint_plugins` entry point (`entropy_kv_api`). vLLM loads endpoint plugins only
when they are named in `VLLM_PLUGINS`, which also filters the general plugins, so the
launcher (`vllm_entropy_kv.launch.serve_environment`) names both `entropy_kv` and
`entropy_kv_api`. By hand:

    VLLM_PLUGINS=entropy_kv,entropy_kv_api vllm serve MODEL --kv-policy entropy

The totals are the numbers `/metrics` shows (`vllm_entropy_kv_*`), summed by the connector's
Prometheus observer since start-up, over every API server process where vLLM runs several
(`metrics.LiveTotals.snapshot`); they stay 0 with `--disable-log-stats` (no stats reach the
API server) and while the policy is `none`.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from vllm_entropy_kv import metrics
from vllm_entropy_kv.config import KVPolicyConfig
from vllm_entropy_kv.request_args import RequestArgsValidator

PLUGIN_NAME = "entropy_kv_api"
ROUTE = "/v1/kv-policy"
STATE_KEY = "vllm_entropy_kv_config"


def policy_document(config: KVPolicyConfig | None, block_size: int | None = None) -> dict:
    """The JSON body of `GET /v1/kv-policy`."""
    totals = metrics.LIVE_TOTALS.snapshot()
    policy = config.policy if config is not None else None
    mine = totals.get(policy, {}) if policy is not None else {}
    return {
        "settings": {
            **(
                {name: getattr(config, name) for name in KVPolicyConfig.field_names()}
                if config is not None else {}
            ),
            "enabled": bool(config and config.enabled),
            "block_size": block_size,
        },
        "totals": {
            "requests_compressed": mine.get("requests", 0),
            "prompt_tokens": mine.get("prompt_tokens", 0),
            "tokens_kept": mine.get("tokens_kept", 0),
            "tokens_evicted": mine.get("tokens_evicted", 0),
            "tokens_merged": mine.get("tokens_merged", 0),
            "freed_blocks": mine.get("freed_blocks", 0),
            "freed_bytes": mine.get("freed_bytes", 0),
            "cached_blocks_released": mine.get("cached_blocks_released", 0),
            "blocks_kept_in_place": mine.get("blocks_kept_in_place", 0),
            "prefix_hit_tokens": mine.get("prefix_hit_tokens", 0),
        },
        "last_request": mine.get("last_request"),
        "by_policy": totals,
        "metrics_prefix": metrics.PREFIX,
    }


class KVPolicyEndpoint:
    """The `vllm.endpoint_plugins` object (see vllm/plugins/endpoint_plugins/interface.py)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()

        @router.get(ROUTE)
        async def kv_policy(request: Request) -> JSONResponse:
            state = getattr(request.app.state, STATE_KEY, {})
            return JSONResponse(policy_document(state.get("config"), state.get("block_size")))

        app.include_router(router)
        app.add_middleware(RequestArgsValidator, server_config=_server_config)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        vllm_config = getattr(engine_client, "vllm_config", None)
        additional = getattr(vllm_config, "additional_config", None)
        if additional is None:
            additional = getattr(args, "additional_config", None)
        config = KVPolicyConfig.from_additional_config(additional)
        cache_config = getattr(vllm_config, "cache_config", None)
        setattr(state, STATE_KEY, {
            "config": config,
            "block_size": getattr(cache_config, "block_size", None),
        })
        metrics.ensure_info_metric(config)


def _server_config(scope: Any) -> KVPolicyConfig | None:
    """The settings `init_state` stored, or None before it ran."""
    return getattr(scope["app"].state, STATE_KEY, {}).get("config")


def endpoint_plugin() -> KVPolicyEndpoint:
    """Entry point factory."""
    return KVPolicyEndpoint()
