"""Teacher forcing through the server: a request decodes exactly the tokens it names.

A request's cache is compressed at the end of its prefill, so its prompt logprobs, computed
during that prefill from the whole cache, cannot show what compression does to the model. To
score a continuation over the compressed cache, send the context as the prompt and the
continuation's token ids as `vllm_xargs.forced_token_ids`, with `max_tokens` equal to their
number and `logprobs: 0`:

    {"model": ..., "prompt": CONTEXT, "max_tokens": 3, "temperature": 0, "logprobs": 0,
     "ignore_eos": true, "vllm_xargs": {"kv_policy": "entropy", "forced_token_ids": [9, 2, 7]}}

Decode step k then emits id k, and the logprob vLLM reports for it is the model's own: vLLM
computes logprobs before it applies logits processors (`--logprobs-mode raw_logprobs`, the
default). The first id is predicted by the prefill, before compression; the others are read
over the compressed cache. A `vllm.logits_processors` entry point (`entropy_kv_forced_tokens`)
loads it into every vLLM of this install; a request without the key is left alone.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

if TYPE_CHECKING:
    from vllm.config import VllmConfig

FORCED_TOKENS_ARG = "forced_token_ids"


def forced_token_ids(params: SamplingParams) -> list[int] | None:
    """The request's forced ids, or None without the key; `VLLMValidationError` (HTTP 400
    naming `vllm_xargs.forced_token_ids`) when they are not a non-empty list of token ids."""
    value: Any = (params.extra_args or {}).get(FORCED_TOKENS_ARG)
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)):
        raise VLLMValidationError(
            f"{FORCED_TOKENS_ARG} must be a non-empty list of token ids (integers >= 0)",
            parameter=f"vllm_xargs.{FORCED_TOKENS_ARG}", value=value)
    if params.max_tokens is not None and params.max_tokens > len(value):
        raise VLLMValidationError(
            f"max_tokens ({params.max_tokens}) is more than the {len(value)} "
            f"{FORCED_TOKENS_ARG}; the steps after them would not be forced",
            parameter="max_tokens", value=params.max_tokens)
    return value


def _force(ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """Logits that only let the next forced id through (past the end: the model's own)."""
    step = len(output_ids)
    if step >= len(ids):
        return logits
    forced = torch.full_like(logits, float("-inf"))
    forced[ids[step]] = 0.0
    return forced


class ForcedTokensLogitsProcessor(AdapterLogitsProcessor):
    """Forces the tokens of `vllm_xargs.forced_token_ids`, one per decode step."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self.vocab_size = vllm_config.model_config.get_vocab_size()

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        forced_token_ids(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token greedy decoding picks

    def new_req_logits_processor(self, params: SamplingParams) -> functools.partial | None:
        ids = forced_token_ids(params)
        if ids is None:
            return None
        # The API server cannot see the vocabulary size; an id past it would fail the
        # whole batch's indexing here, so it is replaced by the last id of the vocabulary.
        return functools.partial(_force, [min(i, self.vocab_size - 1) for i in ids])
