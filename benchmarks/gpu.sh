#!/usr/bin/env bash
# The CUDA checks, for a machine with a GPU: the device tests (pytest -m cuda, their cuda cases)
# and the optimizer, fine-tuning and layer benchmarks with --device cuda. JSON and logs go to
# OUT_DIR (default results/gpu). Needs torch with CUDA, geoopt, transformers and peft installed.
# Every step runs even when one before it failed; the exit status says whether all passed.
#
#   bash benchmarks/gpu.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-results/gpu}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(), 'torch', torch.__version__)" || exit 1
failed=()
step() {  # step NAME COMMAND...: run, log, remember a failure
  local name=$1; shift
  echo "== $name"
  "$@" 2>&1 | tee -a "$OUT_DIR/gpu.log" || failed+=("$name")
}
step pytest_cuda $PY -m pytest -q -m cuda -k cuda -p no:cacheprovider tests/test_devices.py
step bench_optimizer_L8 $PY -m benchmarks.bench_optimizer --device cuda --layers 8 --rank 32 --skip geoopt \
    --out "$OUT_DIR/bench_optimizer_L8_cuda.json"
step bench_optimizer_L80 $PY -m benchmarks.bench_optimizer --device cuda --layers 80 --rank 32 --skip reference geoopt \
    --rounds 5 --out "$OUT_DIR/bench_optimizer_L80_cuda.json"
step bench_finetune $PY -m benchmarks.bench_finetune --device cuda --rounds "${FINETUNE_ROUNDS:-2}" --steps 10 \
    --out "$OUT_DIR/bench_finetune_cuda.json"
step bench_layer $PY -m benchmarks.bench_layer --device cuda --dtype bf16 --min-run-time 0.2 \
    --out "$OUT_DIR/bench_layer_cuda_bf16.json"
if ((${#failed[@]})); then echo "FAILED: ${failed[*]}"; exit 1; fi
echo "all CUDA checks passed"
