"""vllm-entropy-kv: entropy-guided KV cache compression for vLLM."""


def register() -> None:
    """vLLM general-plugin entry point; runs in every vLLM process and must be idempotent."""
    from vllm_entropy_kv.plugin import register_all

    register_all()
