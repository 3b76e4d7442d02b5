#!/usr/bin/env bash
# The GPU path in one go, for a machine with a CUDA device (docs/benchmarks.md, "The GPU rows"): the CUDA tests
# (fit-up under fp32 / bf16 / fp16, stores resident on the GPU, pinned prefetch) and the bench's GPU rows (P1_gpu,
# P1_gpu_disk, UP_bf16). About 5 minutes on one GPU. Results go to $OUT (default ./gpu-check).
#   bash pipeline/tools/gpu_check.sh            # full sizes
#   QUICK=1 bash pipeline/tools/gpu_check.sh    # smoke test of the same rows
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-check}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv >> "$OUT/device.txt" 2>&1 || true
status=0
"$PYTHON" -m pytest -q -rs tests/test_gpu_path.py 2>&1 | tee "$OUT/tests.txt" || status=1
"$PYTHON" cli.py bench --gpu-only --device cuda ${QUICK:+--quick} --out "$OUT/gpu-bench.json" 2>&1 \
    | tee "$OUT/gpu-bench.txt" || status=1
exit "$status"
