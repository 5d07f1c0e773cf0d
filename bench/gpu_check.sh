#!/usr/bin/env bash
# The device check for a lent GPU machine (about 3-4 minutes): GPU tests, then the GPU benchmark.
# The GPU image lacks some of our packages; they travel as wheels in .whl/ (see the device notes):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl diffusers fastapi starlette uvicorn pydantic pydantic_core \
#     pydantic-settings python-dotenv typing-inspection annotated-types importlib_metadata zipp
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fast_path.py tests/test_sampler_parity.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python3 bench/gpu_bench.py --server --profile --seconds 6 --clients 64 "$@" 2>&1 | tee "$OUT/gpu_bench.txt"
