#!/usr/bin/env bash
# The one prepared device check on a lent NVIDIA machine (benchmarks/RESULTS.md says what
# ran where): build the CUDA kernel, run the CUDA tests, then the op microbenchmark and
# the peer benchmark on the GPU.
# Everything it prints and writes lands in $OUT (default ./gpu-results).
#
# Before the call, on the CPU machine (no network over there; .whl/ and .gpu-data/ are
# git-ignored):
#   scripts/fetch_gpu_wheels.sh           # higher, torchmeta and their pure-Python needs
#   mkdir -p .gpu-data && cp DIR/omniglot_28x28.npz .gpu-data/   # optional: Omniglot costs
# then run it with the device tool, carrying .whl (and .gpu-data):
#   scripts/gpu_check.sh                  # ~5-8 minutes on an H100
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1

echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
git rev-parse --short HEAD 2>/dev/null || true

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # mamlext from the working tree, no install
export TORCH_EXTENSIONS_DIR=$PWD/build/torch_extensions

echo "== build the CUDA kernel"
time python3 -m mamlext info

echo "== CUDA tests"
python3 -m pytest -q -x -p no:cacheprovider -m cuda tests/ 2>&1 | tail -25
python3 -m pytest -q -p no:cacheprovider tests/test_ops.py -k "cuda" 2>&1 | tail -5

echo "== op microbenchmark"
python3 benchmarks/bench_op.py --device cuda --markdown "$OUT/op_cuda.md" --csv "$OUT/op_cuda.csv" | tail -40

echo "== peer benchmark"
python3 -m mamlext.bench --device cuda --quick --out "$OUT" --timeout 240 | tail -40

if [ -f .gpu-data/omniglot_28x28.npz ]; then
  echo "== Omniglot: FLOPs and seconds per meta-training iteration (paper settings)"
  python3 benchmarks/omniglot_cost.py --data-root .gpu-data --device cuda | tee "$OUT/omniglot_cost_cuda.md"
fi
ls -la "$OUT"
