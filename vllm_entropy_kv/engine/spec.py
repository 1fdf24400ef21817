"""One KV cache group per layer, so each layer holds and frees its own blocks.

vLLM puts layers with equal specs in one group sharing one block table. Tagging the
full-attention spec with its layer index makes every layer's spec distinct and unmergeable,
so `get_kv_cache_groups` builds one group per layer; all groups draw from one `BlockPool`,
and a block freed by one layer can be used by any other.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from vllm.model_executor.layers.attention.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_entropy_kv.config import KVPolicyConfig

_WRAPPED_MARK = "_vllm_entropy_kv_wrapped"


@dataclass(frozen=True, kw_only=True)
class LayerFullAttentionSpec(FullAttentionSpec):
    """Full attention for exactly one layer (`layer_idx`)."""

    layer_idx: int

    @classmethod
    def merge(cls, specs: list[LayerFullAttentionSpec]) -> LayerFullAttentionSpec:
        # The stock merge would rebuild a plain FullAttentionSpec and drop layer_idx.
        if not all(spec == specs[0] for spec in specs):
            raise AssertionError("a LayerFullAttentionSpec group holds one layer only")
        return specs[0]

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(spec == self for spec in kv_cache_specs.values())


class LayerFullAttentionManager(FullAttentionManager):
    """The stock full-attention manager; `engine/block_table.py` swaps a compacted
    request's prompt blocks for its kept blocks in it."""


def register_layer_spec() -> None:
    KVCacheSpecRegistry._ensure_registered()  # else the built-in specs lose their managers
    KVCacheSpecRegistry.register(
        LayerFullAttentionSpec,
        LayerFullAttentionManager,
        uniform_type_base_spec=LayerFullAttentionSpec,
    )


def install_layer_spec() -> None:
    """Make attention layers report a layer-tagged spec when a policy is on."""
    if getattr(Attention.get_kv_cache_spec, _WRAPPED_MARK, False):
        return
    original = Attention.get_kv_cache_spec

    @functools.wraps(original)
    def get_kv_cache_spec(self: Attention, vllm_config):
        spec = original(self, vllm_config)
        if not KVPolicyConfig.from_additional_config(vllm_config.additional_config).enabled:
            return spec
        if type(spec) is not FullAttentionSpec:
            return spec  # rejected at start-up (setup.py); never tag other kinds
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
        return LayerFullAttentionSpec(**fields, layer_idx=extract_layer_index(self.layer_name))

    setattr(get_kv_cache_spec, _WRAPPED_MARK, True)
    Attention.get_kv_cache_spec = get_kv_cache_spec
