"""The embedded model on HF transformers, and one forward step over a (compressed) cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vllm_entropy_kv import assets
from vllm_entropy_kv.eval.attention import AttentionState, LayerRecord, register
from vllm_entropy_kv.eval.cache import KVState
from vllm_entropy_kv.policies import Rope

# vLLM stores the cache in bfloat16: memory is reported at 2 bytes per element whatever the
# harness computes in.
STORED_BYTES_PER_ELEMENT = 2


@dataclass
class Model:
    """A causal LM in eval mode whose attention runs through `eval_attention`."""

    lm: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path

    @property
    def num_layers(self) -> int:
        return self.lm.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.lm.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        cfg = self.lm.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @cached_property
    def rope(self) -> Rope | None:
        """The model's RoPE (HF's rotary embedding: its inverse frequencies and the scale it
        puts on cos and sin) over offsets up to the model's context, or None without one."""
        rotary = getattr(self.lm.model, "rotary_emb", None)
        if rotary is None or not hasattr(rotary, "inv_freq"):
            return None
        return Rope.from_inverse_frequencies(rotary.inv_freq,
                                             self.lm.config.max_position_embeddings,
                                             getattr(rotary, "attention_scaling", 1.0))

    @cached_property
    def kv_bytes_per_token_layer(self) -> int:
        """Bytes one token's K and V take in one layer, as vLLM stores them (bf16)."""
        return 2 * self.num_kv_heads * self.head_dim * STORED_BYTES_PER_ELEMENT

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    def encode(self, text: str) -> torch.Tensor:
        """Token ids [1, n] without special tokens (callers add the template they need)."""
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        return ids

    def forward(
        self,
        input_ids: torch.Tensor,
        kv: KVState | None = None,
        *,
        record: slice | None = None,
        use_bias: bool = True,
        logits: slice | None = None,
    ) -> Step:
        """Run `input_ids` [rows, m] after `kv` (None: an empty cache) at logical positions
        kv.position .. kv.position + m - 1; the cache grows in place. More than one row only
        over a stacked state (`cache.stack`).

        record: which of this chunk's query positions to record per layer (with the layer's
            full keys and values). logits: the positions to compute logits for (None: none).
        """
        kv = kv if kv is not None else KVState.empty()
        m = input_ids.shape[1]
        state = AttentionState(
            record_queries=record, bias=kv.bias, use_bias=use_bias, key_mask=kv.key_mask
        )
        positions = torch.arange(kv.position, kv.position + m).expand(input_ids.shape[0], m)
        hidden = self.lm.model(
            input_ids=input_ids,
            position_ids=positions,
            past_key_values=kv.cache,
            use_cache=True,
            kv_eval=state,
        ).last_hidden_state
        kv.position += m
        out = None if logits is None else self.lm.lm_head(hidden[:, logits]).float()
        return Step(logits=out, records=state.records, kv=kv)


@dataclass
class Step:
    """The result of `Model.forward`: logits [rows, positions, vocab] or None, per-layer
    records."""

    logits: torch.Tensor | None
    records: dict[int, LayerRecord]
    kv: KVState


def auto_threads() -> int:
    """Torch threads for a shared machine: the cores left idle by the current load (at least 1).

    On a busy machine an extra thread is far worse than none: measured here with two cores and
    a load of ~3, a 512-token prefill took 3.3 s on 1 thread and 11-13 s on 2 threads.
    """
    cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, min(torch.get_num_threads(), cores - busy))


def load_model(
    path: Path | None = None, dtype: torch.dtype = torch.float32, threads: int | None = None
) -> Model:
    """Load the embedded model (assets.model_dir()) in eval mode with the harness's attention,
    on `threads` torch threads (None: `auto_threads()`)."""
    torch.set_grad_enabled(False)
    torch.set_num_threads(threads or auto_threads())
    path = Path(path or assets.model_dir())
    name = register()
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=name)
    lm.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Model(lm=lm, tokenizer=tokenizer, path=path)
