"""Start-up: the settings a policy needs from vLLM, applied or refused with a clear error.

Runs in the API server inside `EngineArgs.create_engine_config`, before the config is sent
to the engine core and workers, so every process sees the same, consistent configuration.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from vllm.logger import init_logger
from vllm.utils.torch_utils import is_quantized_kv_cache

from vllm_entropy_kv.config import KVPolicyConfig

logger = init_logger(__name__)

_WRAPPED_MARK = "_vllm_entropy_kv_wrapped"
# Fine-grained reclamation: a layer frees whole blocks, so smaller blocks free more.
COMPRESSION_BLOCK_SIZE = 32
RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"


class UnsupportedWithPolicyError(ValueError):
    """A vLLM feature or model the KV policy cannot work with."""


def prepare_engine_args(engine_args: Any, config: KVPolicyConfig) -> None:
    """Adjust EngineArgs before vLLM builds its config (a policy is on)."""
    from vllm.config import KVTransferConfig

    from vllm_entropy_kv.engine.connector import CONNECTOR_NAME

    if engine_args.speculative_config:
        raise UnsupportedWithPolicyError(
            f"--kv-policy {config.policy}: speculative decoding is not supported with KV "
            "compression (draft tokens would read the compacted cache); use --kv-policy none"
        )
    if engine_args.kv_transfer_config is not None:
        raise UnsupportedWithPolicyError(
            f"--kv-policy {config.policy}: --kv-transfer-config is taken by the compression "
            "connector; other KV connectors cannot be combined with it"
        )
    if engine_args.pipeline_parallel_size > 1:
        raise UnsupportedWithPolicyError(
            f"--kv-policy {config.policy}: --pipeline-parallel-size "
            f"{engine_args.pipeline_parallel_size} is not supported with KV compression: each "
            "stage holds only its own layers, and compression plans every layer of a request "
            "in one worker; use --tensor-parallel-size, or --kv-policy none"
        )
    if is_quantized_kv_cache(engine_args.kv_cache_dtype or "auto"):
        raise UnsupportedWithPolicyError(
            f"--kv-policy {config.policy}: --kv-cache-dtype {engine_args.kv_cache_dtype} is "
            "not supported with KV compression: compaction reads the prompt's keys back from "
            "the paged cache, which a quantised cache holds scaled and rounded; use "
            "--kv-cache-dtype auto (the model's dtype)"
        )
    # Chunked prefill, async scheduling, prefix caching and max_num_batched_tokens stay as
    # vLLM sets them: compression observes the prompt's last chunk and reads earlier keys
    # from the cache, writes the kept tokens to fresh blocks (a prompt block keeps the tokens
    # its hash names) and releases blocks only after the step that stopped reading them
    # (docs/ENGINE.md).
    if engine_args.block_size is None:
        _set_arg(engine_args, "block_size", COMPRESSION_BLOCK_SIZE,
                 "a layer frees whole blocks, and 32-token blocks (the smallest the CPU "
                 "kernel takes) free more of a compressed prompt than vLLM's default of 128")
    if RESERVED_CPU_ENV not in os.environ:
        reserved = str(engine_args.tensor_parallel_size)
        _log_change(RESERVED_CPU_ENV, None, reserved,
                    "vLLM reserves an extra CPU core per rank for any KV connector (NIXL "
                    "needs one); the compression connector moves no data, and a different "
                    "core count would change the worker's numerics")
        os.environ[RESERVED_CPU_ENV] = reserved
    engine_args.kv_transfer_config = KVTransferConfig(
        kv_connector=CONNECTOR_NAME,
        kv_connector_module_path="vllm_entropy_kv.engine.connector",
        kv_role="kv_both",
    )


def _log_change(setting: str, old: Any, new: Any, reason: str) -> None:
    """One WARNING per vLLM setting the plugin changes, so that nothing changes silently;
    nothing when the value is already what compression needs."""
    if old != new:
        shown_old = "unset (vLLM's default)" if old is None else old
        logger.warning("vllm-entropy-kv: %s %s -> %s: %s", setting, shown_old, new, reason)


def _set_arg(engine_args: Any, name: str, new: Any, reason: str) -> None:
    """Set one EngineArgs field, logging the change (`_log_change`)."""
    _log_change(name, getattr(engine_args, name), new, reason)
    setattr(engine_args, name, new)


def comparison_flags() -> list[str]:
    """`vllm serve` flags that give a `none` server the settings a policy changes
    (`prepare_engine_args`), so outputs can be compared token for token."""
    return ["--block-size", str(COMPRESSION_BLOCK_SIZE)]


def check_platform(config: KVPolicyConfig) -> None:
    """Compression lives in an override of the CPU attention backend; on any other platform
    the policy would silently do nothing, so it is refused."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise UnsupportedWithPolicyError(
            f"--kv-policy {config.policy}: KV compression runs on the CPU build of vLLM only "
            f"(it extends the CPU_ATTN backend); this is a {current_platform.device_name} "
            "platform: use --kv-policy none (the plugin then changes nothing)"
        )


def check_model(vllm_config: Any, config: KVPolicyConfig) -> None:
    hf_config = vllm_config.model_config.hf_text_config
    reasons = []
    if getattr(hf_config, "sliding_window", None) or getattr(hf_config, "layer_types", None) \
            and any(t != "full_attention" for t in hf_config.layer_types):
        reasons.append("it uses sliding-window attention")
    if getattr(hf_config, "alibi", False) or "alibi" in str(
        getattr(hf_config, "position_embedding_type", "")
    ):
        reasons.append("it uses ALiBi positions")
    if vllm_config.model_config.use_mla:
        reasons.append("it uses MLA attention")
    if reasons:
        raise UnsupportedWithPolicyError(
            f"--kv-policy {config.policy} works on full-attention RoPE models only; "
            f"{vllm_config.model_config.model} is refused because {' and '.join(reasons)}"
        )


def install_engine_config_hook() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.create_engine_config, _WRAPPED_MARK, False):
        return
    original = EngineArgs.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args: Any, **kwargs: Any):
        config = KVPolicyConfig.from_additional_config(self.additional_config)
        if config.enabled:
            check_platform(config)
            prepare_engine_args(self, config)
        vllm_config = original(self, *args, **kwargs)
        if config.enabled:
            check_model(vllm_config, config)
            logger.info("vllm-entropy-kv: policy %s, budget %s, block size %d",
                        config.policy, config.budget, vllm_config.cache_config.block_size)
        return vllm_config

    setattr(create_engine_config, _WRAPPED_MARK, True)
    EngineArgs.create_engine_config = create_engine_config
