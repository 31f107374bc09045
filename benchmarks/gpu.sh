#!/usr/bin/env bash
# The CUDA checks, for a machine with a GPU: the device tests (pytest -m cuda, their cuda cases)
# and the optimizer, layer and fine-tuning benchmarks with --device cuda. JSON and logs go to
# OUT_DIR (default results/gpu). Needs torch with CUDA, geoopt, transformers and peft installed.
#
#   bash benchmarks/gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-results/gpu}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(), 'torch', torch.__version__)"

echo "== tests on cuda"
$PY -m pytest -q -m cuda -k cuda -p no:cacheprovider tests/test_devices.py 2>&1 | tee "$OUT_DIR/pytest_cuda.log"

echo "== optimizer step, N=8 and N=80 LLaMA-70B layers, rank 32"
$PY -m benchmarks.bench_optimizer --device cuda --layers 8 --rank 32 --skip geoopt --out "$OUT_DIR/bench_optimizer_L8_cuda.json"
$PY -m benchmarks.bench_optimizer --device cuda --layers 80 --rank 32 --skip reference geoopt --rounds 5 \
    --out "$OUT_DIR/bench_optimizer_L80_cuda.json"

echo "== spectral layer vs dense, bf16"
$PY -m benchmarks.bench_layer --device cuda --dtype bf16 --min-run-time 0.2 --out "$OUT_DIR/bench_layer_cuda_bf16.json"

echo "== SmolLM2-135M fine-tuning step"
$PY -m benchmarks.bench_finetune --device cuda --rounds ${FINETUNE_ROUNDS:-2} --steps 10 --out "$OUT_DIR/bench_finetune_cuda.json"
