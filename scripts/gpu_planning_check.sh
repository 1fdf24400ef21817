#!/usr/bin/env bash
# The planning bench on a GPU machine that has only Python with PyTorch + CUDA (no vLLM, no
# package registry), the repository copied there:
#   1. --check-device: plans on CUDA tensors equal plans on CPU copies (exit 1 otherwise);
#   2. timings of the default CUDA grid, written into docs/BENCHMARKS.md (planning-cuda).
# Results (logs and the page) go to $OUT (default reports/gpu-planning).
# DEVICE=cpu runs the same steps on a tiny CPU grid, to test this script without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-reports/gpu-planning}
mkdir -p "$OUT"
BENCH=("$PYTHON" -m vllm_entropy_kv.bench.planning --device "$DEVICE")
POLICIES=entropy,entropy-merge,h2o,none,pyramid,random,snapkv,src,streaming,topk

if [[ "$DEVICE" == cuda ]]; then
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
    CHECK=(--shapes embedded,llama3-8b --tokens 2048)
    TIMING=()
else
    CHECK=(--shapes embedded --tokens 300)
    TIMING=(--shapes embedded --tokens 300 --policies entropy,src)
fi

status=0
"${BENCH[@]}" --check-device --policies "$POLICIES" "${CHECK[@]}" --warmup 0 --repeats 1 \
    2>&1 | tee "$OUT/check-device.log" || status=1
cp docs/BENCHMARKS.md "$OUT/BENCHMARKS.md"
"${BENCH[@]}" "${TIMING[@]}" --write "$OUT/BENCHMARKS.md" 2>&1 | tee "$OUT/timings.log" || status=1
echo "check and timings in $OUT (exit $status)"
exit $status
