"""Needle in a haystack through a running server (OpenAI chat API).

The same needle, question and haystack as the offline test (`eval/needle.py`). Through the
server the whole prompt is compressed at the end of its prefill, so the question, which ends
the prompt, sits in the recent window and in the observation window (query-aware, as SnapKV
measures), unlike the offline test where the question comes after the compressed context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import requests

from vllm_entropy_kv import assets
from vllm_entropy_kv.eval.needle import KEY_PHRASE, NEEDLE, QUESTION, insert_needle
from vllm_entropy_kv.eval.texts import essays_text


@dataclass(frozen=True)
class NeedleResult:
    length: int
    depth: float
    hit: bool
    answer: str


@lru_cache(maxsize=1)
def tokenizer():
    """The embedded model's tokenizer (loaded once)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets.model_dir()))


def needle_message(length: int, depth: float) -> str:
    """A user message of about `length` tokens: haystack with the needle, then the question."""
    tok = tokenizer()
    room = length - len(tok.encode(NEEDLE + QUESTION)) - 16
    haystack = tok.decode(tok.encode(essays_text())[:room])
    return f"{insert_needle(haystack, NEEDLE, depth)}\n\n{QUESTION}"


def ask(url: str, model: str, message: str, extra_body: dict | None = None) -> str:
    response = requests.post(
        f"{url}/v1/chat/completions",
        timeout=600,
        json={
            "model": model,
            "messages": [{"role": "user", "content": message}],
            "temperature": 0,
            "max_tokens": 32,
            **(extra_body or {}),
        },
    )
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def run_server_needle(
    url: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    model: str = assets.SERVED_MODEL_NAME,
    extra_body: dict | None = None,
) -> list[NeedleResult]:
    results = []
    for length in lengths:
        for depth in depths:
            answer = ask(url, model, needle_message(length, depth), extra_body)
            results.append(NeedleResult(length, depth, KEY_PHRASE in answer.lower(), answer))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m vllm_entropy_kv.eval.server_needle --url URL`: hits per policy, side by side
    on one server started with a KV policy (each request names its own policy and budget)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--policies", default="none,entropy")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--lengths", default="3000", help="prompt tokens, comma-separated")
    parser.add_argument("--depths", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another per-request setting, e.g. kv_merge_bias=false")
    args = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.set)
    lengths = [int(n) for n in args.lengths.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    for policy in args.policies.split(","):
        xargs = {"kv_policy": policy} | (
            {} if policy == "none" else {"kv_budget": args.budget, **settings})
        results = run_server_needle(args.url.rstrip("/"), lengths, depths,
                                    extra_body={"vllm_xargs": xargs})
        missed = [(r.length, r.depth) for r in results if not r.hit]
        print(f"{policy}: {sum(r.hit for r in results)}/{len(results)} hits; missed "
              f"(length, depth): {missed}", flush=True)


if __name__ == "__main__":
    main()
