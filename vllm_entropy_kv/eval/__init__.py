"""Offline evaluation of the KV policies on HF transformers (CPU): perplexity, needle in a
haystack, attention-output reconstruction error and memory over a stream.

Run `python -m vllm_entropy_kv.eval --help`. Nothing here imports vLLM.
"""
