"""The serving benchmark (`python -m vllm_entropy_kv.bench`): real servers, HTTP only."""
