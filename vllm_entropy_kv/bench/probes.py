"""What the serving benchmark sends to a server and what it reads back, over HTTP only.

Every request names its policy and budget in `vllm_xargs`, so one server started with a
policy serves every cell of the grid with the same scheduling and KV memory, `none` included
(the request's cache is then kept whole).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import requests
import torch

from vllm_entropy_kv.assets import SERVED_MODEL_NAME
from vllm_entropy_kv.eval.perplexity import Scored
from vllm_entropy_kv.eval.server_needle import run_server_needle, tokenizer
from vllm_entropy_kv.eval.texts import Document, essays_text
from vllm_entropy_kv.forced_tokens import FORCED_TOKENS_ARG
from vllm_entropy_kv.launch import metric

QUESTION = "\n\nQuestion: what is the main point of the text above?\nAnswer:"


@dataclass(frozen=True)
class Cell:
    """One column of the benchmark: a policy at a budget (`none` keeps everything)."""

    policy: str
    budget: float = 1.0
    settings: tuple[tuple[str, object], ...] = ()  # other per-request settings (vllm_xargs)

    @property
    def label(self) -> str:
        name = "none" if self.policy == "none" else f"{self.policy}@{self.budget:g}"
        return name + "".join(f" {key}={json.dumps(value)}" for key, value in self.settings)

    def xargs(self) -> dict[str, object]:
        if self.policy == "none":
            return {"kv_policy": "none"}
        return {"kv_policy": self.policy, "kv_budget": self.budget, **dict(self.settings)}


def parse_policy(spec: str) -> tuple[str, tuple[tuple[str, object], ...]]:
    """`NAME[:kv_FIELD=VALUE...]` into the policy's name and its per-request settings, e.g.
    `entropy:kv_recent_tokens=128`; a value is read as JSON when it parses, else as a string.
    The server validates the settings (HTTP 400 names a bad field)."""
    name, *pairs = spec.split(":")
    settings = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("kv_"):
            raise ValueError(f"{spec!r}: settings are kv_FIELD=VALUE, got {pair!r}")
        try:
            settings.append((key, json.loads(value)))
        except json.JSONDecodeError:
            settings.append((key, value))
    return name, tuple(settings)


@lru_cache(maxsize=1)
def _essay_tokens() -> list[int]:
    return tokenizer().encode(essays_text())


def prompt_of_tokens(num_tokens: int, offset: int = 0) -> str:
    """About `num_tokens` tokens of the Paul Graham essays from token `offset`, then a question."""
    tokens = _essay_tokens()
    start = offset % max(1, len(tokens) - num_tokens)
    return tokenizer().decode(tokens[start : start + num_tokens - 16]) + QUESTION


@dataclass(frozen=True)
class Timing:
    """One streamed completion: time to first token, time per output token after it."""

    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float
    total_s: float
    peak_kv_fraction: float = 0.0  # of the server's KV pool, sampled while it ran
    token_times: tuple[float, ...] = ()  # perf_counter() at each streamed chunk with text


KV_USAGE = "vllm:kv_cache_usage_perc"  # a fraction of the pool, despite its name


def timed_completion(url: str, prompt: str, cell: Cell, max_tokens: int) -> Timing:
    started = time.perf_counter()
    token_times: list[float] = []
    usage: dict = {}
    with requests.post(f"{url}/v1/completions", stream=True, timeout=3600, json={
        "model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}, "vllm_xargs": cell.xargs(),
    }) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data:") or line.endswith(b"[DONE]"):
                continue
            chunk = json.loads(line[5:])
            usage = chunk.get("usage") or usage
            if any(choice.get("text") for choice in chunk.get("choices") or ()):
                token_times.append(time.perf_counter())
    end = time.perf_counter()
    if not token_times:
        raise RuntimeError(f"{cell.label}: the stream carried no text")
    output_tokens = int(usage.get("completion_tokens", max_tokens))
    first, last = token_times[0], token_times[-1]
    return Timing(
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        output_tokens=output_tokens,
        ttft_s=first - started,
        tpot_s=(last - first) / max(1, output_tokens - 1),
        total_s=end - started,
        token_times=tuple(token_times),
    )


class PeakSampler:
    """Samples a metric in the background: its peak, and (seconds since start, value)."""

    def __init__(self, url: str, name: str, period_s: float = 0.25) -> None:
        self.url, self.name, self.period_s = url, name, period_s
        self.peak = 0.0
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            try:
                value = metric(self.url, self.name)
                self.samples.append((time.monotonic() - started, value))
                self.peak = max(self.peak, value)
            except requests.RequestException:
                pass
            self._stop.wait(self.period_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class Batch:
    """Requests sent at once: timings, peak running requests, preemptions, throughput."""

    timings: list[Timing]
    peak_running: int
    preemptions: int
    seconds: float
    peak_kv_fraction: float

    @property
    def output_tokens_per_s(self) -> float:
        return sum(t.output_tokens for t in self.timings) / self.seconds

    @property
    def mean_tpot_s(self) -> float:
        return sum(t.tpot_s for t in self.timings) / len(self.timings)

    @property
    def mean_ttft_s(self) -> float:
        return sum(t.ttft_s for t in self.timings) / len(self.timings)

    @property
    def all_decoding_tpot_s(self) -> float | None:
        """Time per output token while every request of the batch decodes: from the last
        first token (no prefill left to interleave) to the first request's end, the mean
        over requests of the gaps between their tokens in that window. None when the
        requests never all decoded at once (e.g. the pool could not hold them) or the
        window holds fewer than two tokens of some request."""
        if not all(t.token_times for t in self.timings):
            return None
        start = max(t.token_times[0] for t in self.timings)
        end = min(t.token_times[-1] for t in self.timings)
        gaps = []
        for t in self.timings:
            window = [s for s in t.token_times if start <= s <= end]
            if len(window) < 2:
                return None
            gaps.append((window[-1] - window[0]) / (len(window) - 1))
        return sum(gaps) / len(gaps)


def concurrent_batch(url: str, prompts: list[str], cell: Cell, max_tokens: int) -> Batch:
    preempted = metric(url, "vllm:num_preemptions_total")
    started = time.perf_counter()
    with PeakSampler(url, "vllm:num_requests_running") as running, \
            PeakSampler(url, KV_USAGE) as kv_usage, ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        timings = list(pool.map(lambda p: timed_completion(url, p, cell, max_tokens), prompts))
    return Batch(
        timings=timings,
        peak_running=int(running.peak),
        preemptions=int(metric(url, "vllm:num_preemptions_total") - preempted),
        seconds=time.perf_counter() - started,
        peak_kv_fraction=kv_usage.peak,
    )


def sampled_completion(url: str, prompt: str, cell: Cell, max_tokens: int) -> Timing:
    """`timed_completion` with the peak KV pool use while it ran (alone on the server)."""
    with PeakSampler(url, KV_USAGE) as kv_usage:
        timing = timed_completion(url, prompt, cell, max_tokens)
    return dataclasses.replace(timing, peak_kv_fraction=kv_usage.peak)


def needle_hits(url: str, cell: Cell, length: int, depths: list[float]) -> int:
    results = run_server_needle(url, [length], depths, extra_body={"vllm_xargs": cell.xargs()})
    return sum(r.hit for r in results)


def encode(text: str) -> torch.Tensor:
    """Token ids [1, n] of the served model, without special tokens (as `Model.encode`)."""
    return tokenizer()(text, add_special_tokens=False, return_tensors="pt").input_ids


def continuation_nll(url: str, document: Document, cell: Cell) -> Scored:
    """The document's continuation scored over its compressed context by teacher forcing
    (`vllm_entropy_kv.forced_tokens`). Its first token, predicted by the prefill before
    compression, is left out, as offline (`eval/perplexity.py`)."""
    forced = document.continuation[0].tolist()
    response = requests.post(f"{url}/v1/completions", timeout=3600, json={
        "model": SERVED_MODEL_NAME, "prompt": document.context[0].tolist(),
        "max_tokens": len(forced), "temperature": 0, "logprobs": 0, "ignore_eos": True,
        "return_tokens_as_token_ids": True,
        "vllm_xargs": {**cell.xargs(), FORCED_TOKENS_ARG: forced},
    })
    response.raise_for_status()
    logprobs = response.json()["choices"][0]["logprobs"]
    emitted = [int(token.removeprefix("token_id:")) for token in logprobs["tokens"]]
    if emitted != forced:
        raise RuntimeError(f"{cell.label}: the server did not decode the forced tokens "
                           "(is the vllm.logits_processors entry point installed?)")
    return Scored(nll=-sum(logprobs["token_logprobs"][1:]), tokens=len(forced) - 1)
