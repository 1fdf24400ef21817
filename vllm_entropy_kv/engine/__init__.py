"""vLLM integration: per-layer KV cache groups, the attention backend that observes prefill
and reads compacted caches, the connector that carries results to the scheduler, and the
start-up constraints. Policies themselves live in `vllm_entropy_kv.policies`."""
