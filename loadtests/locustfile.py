"""Locust users that speak the OpenAI API of `vllm serve` (`/v1/chat/completions` and
`/v1/completions`, streamed and not).

Profile, from the environment variable `LOADTEST_PROFILE` (default `short`):

- `short`: short chat questions and short completion prompts;
- `long`: long-context questions over the real texts (a window of the Paul Graham essays or of
  a Gutenberg text, then a question about it);
- `mix`: both, three short requests for each long one;
- `chat`: multi-turn conversations, streamed: each user opens with a long context and a
  question, then for `LOADTEST_CHAT_TURNS` turns (default 6) sends the whole conversation so
  far (its earlier questions and the server's answers) and a new question with
  `LOADTEST_CHAT_WORDS` more words of text (default 200), so the prompt grows turn by turn
  (from about 1.3k to 4k tokens at the defaults) and each turn can reuse the last one's
  prefix-cached prompt.

Streamed requests also report, as custom locust entries (request type `METRIC`, times in ms):
`TTFT <name>` (time to the first generated text) and `TPOT <name>` (time per output token
after the first, from the usage the server reports at the end of the stream). The main entry
of a streamed request measures the whole stream, not only the response headers.

Other knobs: `LOADTEST_MODEL` (default: the embedded model's served name),
`LOADTEST_MAX_TOKENS` (default 48), `LOADTEST_LONG_WORDS` (default 1000 words per long
prompt, about 1250 tokens: on the 2-core machine, busy with other jobs, `vllm serve` took
about 37 s to answer one such prompt and 82 s for 2000 words, so keep runs of the `long`
profile a few minutes long). `LOADTEST_KV_BUDGETS` (e.g. `0.1,0.25,0.5`): each request
picks one of these budgets and sends it as its own (`vllm_xargs.kv_budget`; the server must
run a KV policy); `LOADTEST_KV_POLICY` likewise sends `vllm_xargs.kv_policy`. Unset: the
server's settings.

Run it through `loadtests/run.py` (`make loadtest`), or by hand:
`LOADTEST_PROFILE=mix locust -f loadtests/locustfile.py -H http://127.0.0.1:8000 --headless -u 4 -t 60s`
"""

from __future__ import annotations

import json
import os
import random
import time
from functools import lru_cache
from typing import Any

import gevent
from locust import HttpUser, between, events

from vllm_entropy_kv import assets

PROFILES = ("short", "long", "mix", "chat")
PROFILE = os.environ.get("LOADTEST_PROFILE", "short")
if PROFILE not in PROFILES:
    raise SystemExit(f"LOADTEST_PROFILE={PROFILE!r}; valid: {', '.join(PROFILES)}")
MODEL = os.environ.get("LOADTEST_MODEL", assets.SERVED_MODEL_NAME)
MAX_TOKENS = int(os.environ.get("LOADTEST_MAX_TOKENS", "48"))
LONG_WORDS = int(os.environ.get("LOADTEST_LONG_WORDS", "1000"))
KV_BUDGETS = tuple(
    float(b) for b in os.environ.get("LOADTEST_KV_BUDGETS", "").split(",") if b.strip()
)
KV_POLICY = os.environ.get("LOADTEST_KV_POLICY", "")
CHAT_TURNS = int(os.environ.get("LOADTEST_CHAT_TURNS", "6"))
CHAT_WORDS = int(os.environ.get("LOADTEST_CHAT_WORDS", "200"))
METRIC = "METRIC"
TIMEOUT_S = 300

SHORT_QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "What is 12 times 7?",
    "Give me a synonym for 'happy'.",
    "Why is the sky blue? Answer briefly.",
    "List two planets of the solar system.",
    "What language is spoken in Brazil?",
    "Describe a cat in five words.",
    "Who wrote Hamlet?",
)
SHORT_PROMPTS = (
    "Once upon a time",
    "The weather today is",
    "A good recipe for bread starts with",
    "The three laws of motion are",
    "In the middle of the night, the old house",
    "The most important thing about programming is",
)
LONG_QUESTIONS = (
    "What is the main point of the text above?",
    "Summarize the passage above in two sentences.",
    "Which people or characters are named in the passage above?",
    "What happens at the end of the passage above?",
    "Quote one sentence from the passage above.",
)
# Skip front matter (title pages, licence headers) of the Gutenberg texts.
_START_FRACTION = 0.1


@lru_cache(maxsize=1)
def long_sources() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(name, words) of each real text: the essays, then every Gutenberg text."""
    from vllm_entropy_kv.eval.texts import essays_text

    assets.prepare_texts()  # reuses the prepared texts; builds them only if missing
    sources = [("essays", tuple(essays_text().split()))]
    for path in sorted((assets.texts_dir() / "gutenberg").glob("*.txt")):
        words = path.read_text(encoding="utf-8", errors="replace").split()
        sources.append((path.stem, tuple(words[int(len(words) * _START_FRACTION):])))
    return tuple((name, words) for name, words in sources if len(words) > LONG_WORDS)


def words_of_text(rng: random.Random, num_words: int) -> str:
    """`num_words` consecutive words of one of the real texts, from a random place."""
    _name, words = rng.choice(long_sources())
    at = rng.randrange(0, len(words) - num_words)
    return " ".join(words[at : at + num_words])


def long_context(rng: random.Random) -> str:
    return words_of_text(rng, LONG_WORDS)


def report_metric(name: str, value_ms: float) -> None:
    events.request.fire(
        request_type=METRIC, name=name, response_time=value_ms, response_length=0,
        exception=None, context={},
    )


class OpenAIUser(HttpUser):
    """One client: waits 0.5-2 s between requests, one request per task."""

    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.conversation: list[dict[str, str]] = []

    # --- requests -------------------------------------------------------------------------

    def _body(self, endpoint: str, text: str | list[dict[str, str]],
              stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0.7, "stream": stream,
            # An answer may end at once (EOS first); one token keeps TTFT measurable.
            "min_tokens": 1,
        }
        if endpoint == "chat":
            body["messages"] = text if isinstance(text, list) else [
                {"role": "user", "content": text}]
        else:
            body["prompt"] = text
        if stream:
            body["stream_options"] = {"include_usage": True}
        kv_settings: dict[str, Any] = {}
        if KV_BUDGETS:
            kv_settings["kv_budget"] = self.rng.choice(KV_BUDGETS)
        if KV_POLICY:
            kv_settings["kv_policy"] = KV_POLICY
        if kv_settings:
            body["vllm_xargs"] = kv_settings
        return body

    def request(self, endpoint: str, text: str | list[dict[str, str]], stream: bool,
                label: str) -> str | None:
        """POST one request (a prompt, or a chat's messages); `label` names its locust
        entries (e.g. `chat-stream`). Returns the generated text, None if it failed."""
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        body = self._body(endpoint, text, stream)
        if not stream:
            with self.client.post(path, json=body, name=label, timeout=TIMEOUT_S,
                                  catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                    return
                try:
                    data = resp.json()
                    if not data["choices"] or data["usage"]["completion_tokens"] < 1:
                        resp.failure("no tokens generated")
                        return None
                    choice = data["choices"][0]
                    return choice["message"]["content"] if endpoint == "chat" \
                        else choice["text"]
                except (ValueError, KeyError, TypeError) as e:
                    resp.failure(f"bad response: {e!r}")
            return None

        start = time.perf_counter()
        with self.client.post(path, json=body, name=label, timeout=TIMEOUT_S, stream=True,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            first = last = None
            pieces: list[str] = []
            usage_tokens = None
            size = 0
            finished = False
            try:
                for line in resp.iter_lines():
                    size += len(line) + 1
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        finished = True
                        break
                    chunk = json.loads(payload)
                    if chunk.get("usage"):
                        usage_tokens = chunk["usage"].get("completion_tokens")
                    for choice in chunk.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content") \
                            if endpoint == "chat" else choice.get("text")
                        if piece:
                            now = time.perf_counter()
                            first = first if first is not None else now
                            last = now
                            pieces.append(piece)
            except Exception as e:  # noqa: BLE001 - any broken stream is a failed request
                resp.failure(f"stream broke: {e!r}")
                return None
            end = time.perf_counter()
            # The whole stream, not only the headers, is the request's time.
            resp.request_meta["response_time"] = (end - start) * 1000
            resp.request_meta["response_length"] = size
            if not finished:
                resp.failure("stream ended without [DONE]")
                return None
            if first is None:
                resp.failure("stream carried no generated text")
                return None
        report_metric(f"TTFT {label}", (first - start) * 1000)
        tokens = usage_tokens or len(pieces)
        if tokens > 1 and last is not None and last > first:
            report_metric(f"TPOT {label}", (last - first) * 1000 / (tokens - 1))
        return "".join(pieces)

    # --- tasks ----------------------------------------------------------------------------

    def short_chat(self) -> None:
        self.request("chat", self.rng.choice(SHORT_QUESTIONS), False, "chat")

    def short_chat_stream(self) -> None:
        self.request("chat", self.rng.choice(SHORT_QUESTIONS), True, "chat-stream")

    def short_completion(self) -> None:
        self.request("completion", self.rng.choice(SHORT_PROMPTS), False, "completion")

    def short_completion_stream(self) -> None:
        self.request("completion", self.rng.choice(SHORT_PROMPTS), True, "completion-stream")

    def _long_text(self) -> str:
        question = self.rng.choice(LONG_QUESTIONS)
        return f"{long_context(self.rng)}\n\nQuestion: {question}\nAnswer:"

    def long_chat(self) -> None:
        self.request("chat", self._long_text(), False, "long-chat")

    def long_chat_stream(self) -> None:
        self.request("chat", self._long_text(), True, "long-chat-stream")

    def long_completion(self) -> None:
        self.request("completion", self._long_text(), False, "long-completion")

    def long_completion_stream(self) -> None:
        self.request("completion", self._long_text(), True, "long-completion-stream")

    def chat_turn(self) -> None:
        """The next turn of this user's conversation (a new one after CHAT_TURNS turns)."""
        question = self.rng.choice(LONG_QUESTIONS)
        if len(self.conversation) >= 2 * CHAT_TURNS:
            self.conversation = []
        if not self.conversation:
            content = f"{long_context(self.rng)}\n\nQuestion: {question}"
        else:
            content = f"More text:\n{words_of_text(self.rng, CHAT_WORDS)}\n\n{question}"
        self.conversation.append({"role": "user", "content": content})
        answer = self.request("chat", self.conversation, True, "chat-turn-stream")
        if answer is None:
            self.conversation = []  # a failed turn ends the conversation
            return
        self.conversation.append({"role": "assistant", "content": answer})


SHORT_TASKS = {
    OpenAIUser.short_chat: 1, OpenAIUser.short_chat_stream: 2,
    OpenAIUser.short_completion: 1, OpenAIUser.short_completion_stream: 2,
}
LONG_TASKS = {
    OpenAIUser.long_chat: 1, OpenAIUser.long_chat_stream: 2,
    OpenAIUser.long_completion: 1, OpenAIUser.long_completion_stream: 2,
}
TASKS = {
    "short": SHORT_TASKS,
    "long": LONG_TASKS,
    # Three short requests for each long one.
    "mix": {**{t: 3 * w for t, w in SHORT_TASKS.items()}, **LONG_TASKS},
    "chat": {OpenAIUser.chat_turn: 1},
}
OpenAIUser.tasks = [task for task, weight in TASKS[PROFILE].items() for _ in range(weight)]


@events.quit.add_listener
def _last_csv_pass(**_kwargs: Any) -> None:
    """Locust rewrites its CSV files once a second and closes them right after this event:
    give its writer one more pass, so requests that ended in the last second are in them."""
    gevent.sleep(1.5)


if PROFILE != "short":
    long_sources()  # load the texts once, before any user starts
