"""Teacher forcing (`vllm_xargs.forced_token_ids`), the way the benchmark scores a
continuation over the compressed cache: the rules without vLLM's engine, then a real server."""

from __future__ import annotations

import json
import os

import pytest
import requests
import torch
from helpers import prompt_of_words

from vllm_entropy_kv import assets
from vllm_entropy_kv.assets import SERVED_MODEL_NAME
from vllm_entropy_kv.eval.server_needle import tokenizer
from vllm_entropy_kv.forced_tokens import ForcedTokensLogitsProcessor, forced_token_ids
from vllm_entropy_kv.launch import VllmServer, default_dtype


def params(forced: object, max_tokens: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, extra_args={"forced_token_ids": forced})


@pytest.mark.parametrize("forced", ["1,2", [], [1, -2], [1.5], [True], {"a": 1}])
def test_forced_ids_that_are_not_token_ids_are_refused_naming_the_field(forced: object) -> None:
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError) as err:
        forced_token_ids(params(forced))
    assert err.value.parameter == "vllm_xargs.forced_token_ids"


def test_more_steps_than_forced_ids_are_refused() -> None:
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError) as err:
        forced_token_ids(params([1, 2], max_tokens=3))
    assert err.value.parameter == "max_tokens"
    assert forced_token_ids(params([1, 2], max_tokens=2)) == [1, 2]


@pytest.fixture(scope="module")
def vllm_config():
    """A real VllmConfig of the embedded model (no engine). Building one runs the CPU
    platform's config check, which sets environment variables for vLLM's worker processes
    (LD_PRELOAD among them): they are put back so that servers started later by this test
    process are not changed."""
    from vllm.config import ModelConfig, VllmConfig

    saved = dict(os.environ)
    try:
        return VllmConfig(model_config=ModelConfig(model=str(assets.prepare_model())))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_each_step_lets_only_its_forced_id_through(vllm_config) -> None:
    from vllm import SamplingParams

    processor = ForcedTokensLogitsProcessor(vllm_config, torch.device("cpu"), False)
    vocab = vllm_config.model_config.get_vocab_size()
    assert processor.new_req_logits_processor(SamplingParams()) is None
    force = processor.new_req_logits_processor(params([3, 7, vocab + 89]))
    logits = torch.arange(vocab, dtype=torch.float32)
    output: list[int] = []
    for expected in (3, 7, vocab - 1):  # an id past the vocabulary becomes its last
        step = force(output, logits)
        assert int(step.argmax()) == expected and torch.isinf(step).sum() == vocab - 1
        output.append(expected)
    assert force(output, logits) is logits  # past the forced ids: the model's own


# Prefill scores a token in one pass over the prompt, decode in a step of its own: in bf16 the
# two round differently (up to 0.16 nats measured); in float32 they agree to 2e-3.
PROMPT_VS_DECODE_TOLERANCE = {"float32": 2e-3, "bfloat16": 0.25}
# The compressed request hits the blocks the `none` request left in the prefix cache and
# recomputes those holding its observation window, so its prefill runs in other pieces: in
# bf16 its first logprob rounds differently (0.006 measured with the 32-query window,
# 2026-12-07); in float32 the pieces agree to 2e-3.
PREFILL_PIECES_TOLERANCE = {"float32": 2e-3, "bfloat16": 0.05}


def forced(url: str, context: list[int], continuation: list[int], policy: str) -> list[float]:
    response = requests.post(f"{url}/v1/completions", timeout=600, json={
        "model": SERVED_MODEL_NAME, "prompt": context, "max_tokens": len(continuation),
        "temperature": 0, "logprobs": 0, "ignore_eos": True, "return_tokens_as_token_ids": True,
        "vllm_xargs": {"kv_policy": policy, "forced_token_ids": continuation},
    })
    response.raise_for_status()
    logprobs = response.json()["choices"][0]["logprobs"]
    assert [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]] == continuation
    return logprobs["token_logprobs"]


@pytest.mark.server
def test_forced_tokens_get_the_models_logprobs_over_the_compressed_cache(
    entropy_server: VllmServer,
) -> None:
    ids = tokenizer().encode(prompt_of_words(900, 500))  # ~1.2k tokens: compressed at 0.25
    context, continuation = ids[:-24], ids[-24:]
    # Uncompressed, decoding the continuation gives the logprobs that scoring it in the prompt
    # gives: the forced steps report the model's own distribution, not the forced one.
    scored = requests.post(f"{entropy_server.url}/v1/completions", timeout=600, json={
        "model": SERVED_MODEL_NAME, "prompt": ids, "max_tokens": 1, "temperature": 0,
        "prompt_logprobs": 0, "vllm_xargs": {"kv_policy": "none"},
    })
    scored.raise_for_status()
    in_prompt = [entry[str(token)]["logprob"] for entry, token in zip(
        scored.json()["choices"][0]["prompt_logprobs"][len(context):], continuation)]
    full = forced(entropy_server.url, context, continuation, "none")
    print("forced - prompt logprobs:", [round(a - b, 4) for a, b in zip(full, in_prompt)])
    assert full == pytest.approx(in_prompt, abs=PROMPT_VS_DECODE_TOLERANCE[default_dtype()])
    # Compressed, the first token (predicted by the prefill, before compression) is the same
    # and the later ones are read over the compressed cache (from the third on: the request is
    # compacted at the start of its first decode step).
    compressed = forced(entropy_server.url, context, continuation, "entropy")
    assert compressed[0] == pytest.approx(full[0], abs=PREFILL_PIECES_TOLERANCE[default_dtype()])
    assert max(abs(a - b) for a, b in zip(compressed[1:], full[1:])) > 1e-2


@pytest.mark.server
@pytest.mark.parametrize(("extra", "param"), [
    ({"max_tokens": 2, "vllm_xargs": {"forced_token_ids": "1,2"}}, "vllm_xargs.forced_token_ids"),
    ({"max_tokens": 2, "vllm_xargs": {"forced_token_ids": [1, -1]}},
     "vllm_xargs.forced_token_ids"),
    ({"max_tokens": 3, "vllm_xargs": {"forced_token_ids": [1, 2]}}, "max_tokens"),
])
def test_bad_forced_tokens_are_a_400_naming_the_field(
    entropy_server: VllmServer, extra: dict, param: str
) -> None:
    response = requests.post(f"{entropy_server.url}/v1/completions", timeout=60, data=json.dumps(
        {"model": SERVED_MODEL_NAME, "prompt": "Hello", **extra}),
        headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "forced_token_ids" in error["message"] and param in (error.get("param") or "") + \
        error["message"], error
