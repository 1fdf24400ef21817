"""Small HTTP helpers shared by the server tests, and the block arithmetic of a budget."""

from __future__ import annotations

import json
import math
import time
import uuid

import requests

from vllm_entropy_kv import assets
from vllm_entropy_kv.assets import SERVED_MODEL_NAME
from vllm_entropy_kv.engine.setup import COMPRESSION_BLOCK_SIZE as BLOCK
from vllm_entropy_kv.eval.texts import essays_text
from vllm_entropy_kv.launch import metric, wait_for_idle_cache  # noqa: F401 - shared
from vllm_entropy_kv.policies import Budget

LAYERS = json.loads((assets.prepare_model() / "config.json").read_text())["num_hidden_layers"]
# The entropy server's settings (conftest.py), as the plugin turns them into a `Budget`.
DEFAULT_BUDGET = Budget(0.25, block_size=BLOCK)


def prompt_of_words(num_words: int, offset: int = 0) -> str:
    words = essays_text().split()[offset : offset + num_words]
    return " ".join(words) + "\n\nQuestion: what is the main point of the text above?\nAnswer:"


def complete(url: str, prompt: str, max_tokens: int = 32, **extra) -> dict:
    response = requests.post(f"{url}/v1/completions", timeout=600, json={
        "model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, **extra,
    })
    response.raise_for_status()
    return response.json()


def cold_salt() -> str:
    """A `cache_salt` no other request has: the request finds nothing in vLLM's prefix cache.
    Comparisons of outputs send every request cold: in bf16 a prompt partly read from the
    cache decodes differently from the same prompt computed whole, in stock vLLM too (AMX,
    32-token blocks, 2026-12-05: one of tests/test_engine.py's three prompts)."""
    return f"cold-{uuid.uuid4().hex}"


def plan_of(url: str, prompt: str) -> tuple[int, dict]:
    """Send `prompt` (4 tokens decoded) and return its token count and the server's plan of
    it: `GET /v1/kv-policy`'s latest compressed request (prompt, budgets, plan digest).
    The request asks for entropy budgets (exponent 1; the server's default is uniform), so
    that its plan depends on every layer's entropy and the comparisons of plans cover them."""
    reply = complete(url, prompt, max_tokens=4, ignore_eos=True,
                     vllm_xargs={"kv_exponent": 1.0})
    plan = requests.get(f"{url}/v1/kv-policy", timeout=30).json()["last_request"]
    return reply["usage"]["prompt_tokens"], plan


def compressed(prompt_tokens: int, budget: Budget = DEFAULT_BUDGET) -> bool:
    """Whether the worker compresses a prompt (`CompressionWorker.compressible_tokens`)."""
    floor = budget.sink_tokens + budget.recent_tokens
    return prompt_tokens // BLOCK * BLOCK >= max(2 * BLOCK, floor + BLOCK)


def kept_blocks(prompt_tokens: int, budget: Budget = DEFAULT_BUDGET) -> int:
    """Blocks, summed over the layers, that a compressed prompt's whole blocks keep.

    `Budget.tokens_per_layer` times the layers is the global budget; every policy splits it
    over the layers (uniformly, by entropy, as a pyramid) by water-filling, which keeps the
    total, then rounds each layer to whole blocks by largest remainder, which keeps the total
    to the nearest block; no layer goes below the sink + recent floor rounded up to a block
    (`policies/budgets.py`). Summary tokens (entropy-merge, src) are slots inside a layer's
    budget, so they need no term of their own. The prompt's partial last block is not
    compressed and comes on top."""
    n = prompt_tokens // BLOCK * BLOCK
    floor = min(n, budget.sink_tokens + budget.recent_tokens)
    per_layer = budget.tokens_per_layer(n)
    return max(LAYERS * math.ceil(floor / BLOCK), math.floor(LAYERS * per_layer / BLOCK + 0.5))


def own_counter(url: str, name: str) -> float:
    """A plugin counter of the `entropy` policy on the server's /metrics."""
    return metric(url, name, 'policy="entropy"')


def wait_for_own_counter(url: str, name: str, at_least: float, timeout_s: float = 60) -> float:
    """Compression stats reach the API server with the engine's step outputs."""
    deadline = time.monotonic() + timeout_s
    value = own_counter(url, name)
    while value < at_least and time.monotonic() < deadline:
        time.sleep(0.5)
        value = own_counter(url, name)
    return value
