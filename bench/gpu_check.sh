#!/usr/bin/env bash
# The device check for a lent GPU machine, about 4 minutes: the GPU tests (fused kernels, CUDA graphs, FP8:
# the quantisation kernel, torch._scaled_mm against the emulation, FP8 FastDiT under graphs), then the
# GPU benchmark (bench/gpu_bench.py: peaks; our bf16 and FP8 pipelines against diffusers eager and under
# torch.compile; errors; per-layer FP8 timings; the profile of one step). Extra arguments go to the
# benchmark (e.g. --server, --forward). Each stage has a time limit so the whole stays inside one call;
# figures land in $OUT (gpu.txt, gpu_tests.txt, gpu_bench.txt, gpu_bench.json) as they are taken.
#
# The GPU image lacks some of our packages; they travel as wheels in .whl/ (carry it: run(carry=[".whl"])).
# Fetch them once, here, before the call:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl diffusers fastapi starlette uvicorn pydantic pydantic_core \
#     pydantic-settings python-dotenv typing-inspection annotated-types importlib_metadata zipp \
#     standardwebhooks sqlalchemy greenlet
# Try the whole script first on the CPU: python bench/gpu_bench.py --dry-run --profile --forward
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export OUT
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
start=$SECONDS
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'CC', torch.cuda.get_device_capability())"
} 2>&1 | tee "$OUT/gpu.txt"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
echo "tests done at $((SECONDS - start)) s" | tee -a "$OUT/gpu_tests.txt"
timeout 175 python3 bench/gpu_bench.py --profile "$@" 2>&1 | tee "$OUT/gpu_bench.txt"
echo "all done at $((SECONDS - start)) s" | tee -a "$OUT/gpu_bench.txt"
