"""Small HTTP helpers shared by the server tests."""

from __future__ import annotations

import time

import requests

from vllm_entropy_kv.assets import SERVED_MODEL_NAME
from vllm_entropy_kv.eval.texts import essays_text
from vllm_entropy_kv.launch import metric


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


def wait_for_idle_cache(url: str, timeout_s: float = 60) -> float:
    """Wait until no KV block is in use; return the last usage seen."""
    deadline = time.monotonic() + timeout_s
    usage = metric(url, "vllm:kv_cache_usage_perc")
    while usage > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
        usage = metric(url, "vllm:kv_cache_usage_perc")
    return usage
