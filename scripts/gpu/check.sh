#!/usr/bin/env bash
# The one prepared check on a lent NVIDIA machine, in a fixed time: build the CUDA kernel,
# run the CUDA tests, compute-sanitizer on a driver of the kernel, then the benchmarks.
#
# Before the call, on the CPU machine (.whl/ and .gpu-data/ are git-ignored):
#   scripts/gpu/prepare.sh DIR      # wheels of higher, torchmeta, ...; DIR/omniglot_28x28.npz
# The call (device tool), carrying [".whl", ".gpu-data"], with timeout_s 600:
#   scripts/gpu/check.sh
# Rehearsal on a machine without a GPU (the same steps on the CPU; no wheels needed where
# the venv has them):
#   PATH=.venv/bin:$PATH GPU_CHECK_DEVICE=cpu GPU_CHECK_DATA=DIR OUT=/tmp/rehearsal scripts/gpu/check.sh
#
# Every step runs under its own timeout, cut so that the whole script ends within
# GPU_CHECK_SECONDS (default 360: a rerun fits in a 15-minute lease); the benchmarks come
# last, so the test results come back even when a benchmark hangs. A native kernel that
# does not build or cannot run fails the tests (MAMLEXT_REQUIRE_NATIVE=1), never skips them.
# What comes back ($OUT, at most 8 files): summary.txt (each step's verdict and time, the
# failed tests), build.txt (the compiler's log and `mamlext info`), pytest.txt (the whole
# output), junit.xml, sanitizer.txt, results.md (the benchmark tables), extra.tar.gz
# (the rest: CSVs, charts, the full log).
set -uo pipefail
cd "$(dirname "$0")/../.."

export DEVICE=${GPU_CHECK_DEVICE:-cuda}
export DATA=${GPU_CHECK_DATA:-.gpu-data}
export OUT=${OUT:-gpu-results}
BUDGET=${GPU_CHECK_SECONDS:-360}
export WORK
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
exec > >(tee "$WORK/log.txt") 2>&1
export PYTHONUNBUFFERED=1 MAMLEXT_REQUIRE_NATIVE=1 MAMLEXT_BUILD_VERBOSE=1
export MAMLEXT_TEST_DEVICE=$DEVICE
export TORCH_EXTENSIONS_DIR=$PWD/build/torch_extensions
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # mamlext from the working tree, no install
START=$SECONDS

note() { echo "$*" | tee -a "$SUMMARY"; }
stop() { note "STOP: $*"; exit 1; }
pack() { tar -czf "$OUT/extra.tar.gz" -C "$WORK" . 2>/dev/null || true; }

# step NAME LIMIT 'COMMAND': under its own timeout, never past the budget; one summary line.
step() {
  local name=$1 limit=$2 command=$3
  local left=$((START + BUDGET - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    note "$(printf '%-7s %-24s the %d s budget is spent' SKIP "$name" "$BUDGET")"
    return
  fi
  echo "== $name (at most $limit s)"
  local began=$SECONDS
  timeout --kill-after=10 "$limit" bash -c "$command"
  local rc=$? verdict=OK
  ((rc != 0)) && verdict=FAIL
  ((rc == 124 || rc == 137)) && verdict=TIMEOUT
  note "$(printf '%-7s %-24s exit %3d %5d s' "$verdict" "$name" "$rc" $((SECONDS - began)))"
  pack
}

# ---- preflight: what is here, and stop at once if something the steps need is missing ----
echo "== preflight"
echo "device $DEVICE, budget $BUDGET s, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
  2>/dev/null || echo "nvidia-smi: none"
{ command -v nvcc >/dev/null && nvcc --version | tail -2; } || echo "nvcc: none on PATH"
echo "CUDA_HOME=${CUDA_HOME:-<unset>} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<unset>}"
gcc --version 2>/dev/null | head -1 || echo "gcc: none"
command -v compute-sanitizer || echo "compute-sanitizer: none on PATH"
python3 - <<'PY' || stop "python3 cannot import torch"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    name, cc = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    print(f"GPU {name}, compute capability {cc[0]}.{cc[1]}; torch built for {torch.cuda.get_arch_list()}")
PY
if [[ $DEVICE == cuda* ]] && ! python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  stop "torch sees no CUDA device"
fi
if ! python3 -c 'import higher' 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 ||
    stop "higher is not importable and .whl/ holds no wheels: run scripts/gpu/prepare.sh DIR on the CPU machine and carry .whl"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || stop "the wheels in .whl/ do not install"
  export PYTHONPATH=$PYTHONPATH:/tmp/site
  python3 -c 'import higher' || stop "higher does not import from the wheels in .whl/"
fi
[[ -f $DATA/omniglot_28x28.npz ]] ||
  stop "no $DATA/omniglot_28x28.npz: run scripts/gpu/prepare.sh DIR on the CPU machine and carry .gpu-data"
note "preflight: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo "device $DEVICE"); $(python3 -c 'import torch; print("torch", torch.__version__)')"

# ---- the kernel, the tests, the sanitizer ------------------------------------------------
step build 240 '
  python3 -m mamlext info >"$OUT/build.txt" 2>&1
  status=$?
  grep "^fused_sgd on" "$OUT/build.txt"
  [[ $status -eq 0 ]] && grep -q "^fused_sgd on ${DEVICE%%:*}: native kernel" "$OUT/build.txt"'

TIMEOUT_OPTION=()
python3 -c 'import pytest_timeout' 2>/dev/null && TIMEOUT_OPTION=(--timeout=150)
export PYTEST_ARGS="${TIMEOUT_OPTION[*]}"
step tests 200 '
  python3 -m pytest -p no:cacheprovider -m "cuda or nvcc" tests/ -rfEs $PYTEST_ARGS \
    --junitxml="$OUT/junit.xml" >"$OUT/pytest.txt" 2>&1
  status=$?
  tail -1 "$OUT/pytest.txt"
  exit $status'
grep -E "^(FAILED|ERROR) " "$OUT/pytest.txt" 2>/dev/null | head -40 | sed 's/^/  /' | tee -a "$SUMMARY"

if [[ $DEVICE == cuda* ]]; then
  step sanitizer 150 '
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # one allocation per tensor: overruns are caught
    : >"$OUT/sanitizer.txt"
    status=0
    for tool in memcheck initcheck; do
      echo "== compute-sanitizer --tool $tool" >>"$OUT/sanitizer.txt"
      compute-sanitizer --tool $tool --error-exitcode 1 python3 scripts/gpu/sanitize.py \
        >>"$OUT/sanitizer.txt" 2>&1 || status=1
      tail -2 "$OUT/sanitizer.txt"
    done
    exit $status'
else  # the rehearsal: the driver itself, without a sanitizer
  step sanitizer 150 'python3 scripts/gpu/sanitize.py --device "$DEVICE" >"$OUT/sanitizer.txt" 2>&1'
fi

# ---- the benchmarks, last ---------------------------------------------------------------
export BENCH_ARGS="--quick"
[[ $DEVICE == cpu ]] && BENCH_ARGS="--quick --configs A --peers higher mamlext"
step op-benchmark 60 '
  python3 benchmarks/bench_op.py --device "$DEVICE" $([[ $DEVICE == cpu ]] && echo --quick) \
    --markdown "$WORK/op.md" --csv "$WORK/op.csv" >"$WORK/op.txt" 2>&1
  status=$?
  cat "$WORK/op.md" >>"$OUT/results.md" 2>/dev/null
  exit $status'
step peer-benchmark 100 '
  python3 -m mamlext bench --device "$DEVICE" $BENCH_ARGS --skip-op --timeout 60 \
    --out "$WORK/bench" >"$WORK/bench.txt" 2>&1
  status=$?
  cat "$WORK"/bench/maml_*.md >>"$OUT/results.md" 2>/dev/null
  exit $status'
step omniglot-cost 60 '
  python3 benchmarks/omniglot_cost.py --data-root "$DATA" --device "$DEVICE" --repeats 3 \
    >"$WORK/omniglot_cost.md" 2>&1
  status=$?
  { echo; echo "## Omniglot: one meta-training iteration"; cat "$WORK/omniglot_cost.md"; } >>"$OUT/results.md"
  exit $status'

note "done in $((SECONDS - START)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
pack
