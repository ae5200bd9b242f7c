#!/usr/bin/env bash
# One device call that runs everything only a GPU can show, writing under $OUT:
# versions, the CUDA/Triton tests, then the benchmarks (bf16 training steps
# first; each result appended to partial.jsonl as it finishes).
#
# Before the call, on the development machine (once per checkout):
#   mkdir -p .whl && cp ../shared/device-wheels/*.whl .whl/ && echo /.whl/ >> .git/info/exclude
# Then, with the device tool:  run(command="bash bench/gpu_session.sh", carry=[".whl"])
# Afterwards: python bench/report.py <files>/bench.json --out bench/results/<device>-models
set -uo pipefail
OUT="${OUT:-/tmp/wmfast-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$OUT/versions.txt"

# the CUDA and kernel tests, and the fast-vs-reference property suite on CUDA
WMFAST_HYPOTHESIS_PROFILE=ci timeout 240 python3 -m pytest tests -q -x \
  -k "cuda or kernels or ops or fast or interp or check" -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15

# benchmarks: models (bf16 training steps first), then the rotary kernels
export WMFAST_BENCH_PARTIAL="$OUT/partial.jsonl"
timeout 420 python3 -m pytest bench/bench_models.py --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench_models.json" 2>&1 | tail -5
timeout 240 python3 -m pytest bench/bench_rotary.py --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench_rotary.json" 2>&1 | tail -5
ls -la "$OUT"
