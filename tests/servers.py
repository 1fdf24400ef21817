"""Starting real `vllm serve` processes for the tests (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vllm_entropy_kv.engine.setup import comparison_flags
from vllm_entropy_kv.launch import VllmServer, free_port

LOG_DIR = Path(__file__).resolve().parent.parent / "reports" / "test-logs"
MAX_MODEL_LEN = 8192
# The setting every policy changes (the block size), given to `none` and stock servers too
# so that outputs compare token for token.
SAME_SCHEDULING = comparison_flags()
TEST_KV_GIB = "1"


def start_server(
    name: str,
    policy: str | None,
    extra_args: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
) -> VllmServer:
    return VllmServer(
        LOG_DIR / f"server-{name}.log",
        port=free_port(),
        policy=policy,
        extra_args=list(extra_args),
        kv_cache_gib=TEST_KV_GIB,
        extra_env=extra_env,
    ).start()
