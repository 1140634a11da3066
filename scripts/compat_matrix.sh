#!/usr/bin/env bash
# The torch and Python versions users install, each tried as a new user would: a clean clone
# of this repository's HEAD, a fresh venv, `pip install torch==T`, `pip install -e ".[test]"`
# (no torchmeta), the native CPU kernel built from an empty cache, the CUDA kernel
# compile-checked with nvcc against that torch's headers (scripts/cuda_compile_check.sh), and
# the op, backward, MAML-vs-higher and inner-checkpoint tests. One row per combination, as a
# Markdown table (docs/compatibility.md holds the last one).
#
# usage: scripts/compat_matrix.sh [PYTHON:TORCH[:full] ...]
#   default: the matrix of docs/compatibility.md. ":full" runs the whole test suite instead.
# Environment: MATRIX_DIR (work folder, default /tmp/mamlext-matrix; each venv is deleted after
# its row), PIP_CACHE_DIR (default $MATRIX_DIR/pip-cache: one download of each wheel).
# PyPI's Linux torch wheels are CUDA builds of several GB; pip's own configuration is
# bypassed (PIP_CONFIG_FILE=/dev/null) so that a site-wide cap on torch cannot refuse one.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MATRIX_DIR=${MATRIX_DIR:-/tmp/mamlext-matrix}
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$MATRIX_DIR/pip-cache}
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
TESTS=(tests/test_ops.py tests/test_backward_twice.py tests/test_maml_vs_higher.py
  tests/test_inner_checkpoint.py)
if [[ $# -gt 0 ]]; then
  COMBOS=("$@")
else
  # torch 2.15 has no wheels for Python 3.10: its newest is 2.14.1 (pip: "from versions: ... 2.14.1")
  COMBOS=(3.11:2.5.1 3.11:2.11.0 3.11:2.15.0 3.10:2.14.1 3.12:2.15.0 3.13:2.15.0:full)
fi
mkdir -p "$MATRIX_DIR"
RESULTS=$MATRIX_DIR/results.tsv
: >"$RESULTS"
COMMIT=$(git -C "$REPO" rev-parse --short HEAD)

# The interpreter for a version: pyenv's, else pythonX.Y on PATH (a pyenv shim on PATH may
# refuse to run a version that is not selected, so every candidate is tried).
find_python() {
  local version=$1 candidate
  for candidate in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python"$version" 2>/dev/null) \
    $(command -v "python$version"); do
    if "$candidate" -c 'import venv' 2>/dev/null; then echo "$candidate"; return 0; fi
  done
}

# Seconds taken by a command, its output appended to a log; sets STATUS.
timed() {
  local log=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >>"$log" 2>&1
  STATUS=$?
  ELAPSED=$((SECONDS - start))
}

row() {
  local python_version=$1 torch_version=$2 mode=${3:-core}
  local work=$MATRIX_DIR/py$python_version-torch$torch_version
  local log=$work/log.txt
  rm -rf "$work"; mkdir -p "$work"
  local python; python=$(find_python "$python_version")
  local install="-" build="-" cuda="-" tests="-" verdict="FAIL"
  echo "== Python $python_version, torch $torch_version ($mode)" | tee -a "$log"
  if [[ -z "$python" ]]; then
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$python_version" "$torch_version" "no Python $python_version" - - - FAIL >>"$RESULTS"
    return
  fi
  git clone -q "$REPO" "$work/src"
  "$python" -m venv "$work/venv"
  local py=$work/venv/bin/python
  timed "$log" 1800 "$py" -m pip install --quiet "torch==$torch_version"
  local torch_status=$STATUS torch_seconds=$ELAPSED
  timed "$log" 900 "$py" -m pip install --quiet -e "$work/src[test]"
  if [[ $torch_status -ne 0 || $STATUS -ne 0 ]]; then
    install="failed (see log)"
  else
    install="$((torch_seconds + ELAPSED)) s"
    local cuda_version
    cuda_version=$("$py" -c 'import torch; print(torch.version.cuda)' 2>>"$log")
    # The native CPU kernel from an empty cache, as a new user's first call.
    export TORCH_EXTENSIONS_DIR=$work/torch_extensions
    timed "$log" 900 "$py" -m mamlext info
    if [[ $STATUS -eq 0 ]] && grep -q "fused_sgd on cpu: native kernel, compiled" "$log"; then
      build="$ELAPSED s"
    else
      build="failed (see log)"
    fi
    (cd "$work/src" && timed "$log" 900 scripts/cuda_compile_check.sh "$py"
      echo "CUDA_CHECK $STATUS $ELAPSED" >>"$log")
    local check; check=$(grep "^CUDA_CHECK" "$log" | tail -1)
    read -r _ cuda_status cuda_seconds <<<"$check"
    if grep -q "^OK: CUDA kernel compiled" "$log"; then
      cuda="OK, $cuda_seconds s (nvcc $(grep -o 'nvcc [0-9.]*' "$log" | head -1 | cut -d' ' -f2) for CUDA $cuda_version)"
    elif grep -q "^SKIP: " "$log"; then
      cuda="skipped: $(grep '^SKIP: ' "$log" | head -1 | cut -d: -f3-)"
    else
      cuda="failed (exit $cuda_status, see log)"
    fi
    local selection=("${TESTS[@]}")
    if [[ "$mode" == "full" ]]; then
      selection=(tests)
      # the tests that read the real Omniglot find it where this checkout's do
      [[ -d "$REPO/../shared/data" ]] && export MAMLEXT_SHARED_DATA=$REPO/../shared/data
    fi
    (cd "$work/src" && timed "$log" 3600 "$py" -m pytest -q -p no:cacheprovider \
      --junitxml="$work/junit.xml" "${selection[@]}"
      echo "PYTEST $STATUS $ELAPSED" >>"$log")
    local summary; summary=$(grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed)" "$log" | tail -1 | tr -d '=' | sed 's/^ *//; s/ in [0-9.]*s.*//')
    local pytest_seconds; pytest_seconds=$(grep "^PYTEST" "$log" | tail -1 | cut -d' ' -f3)
    tests="$summary ($pytest_seconds s)"
    if [[ "$build" == *" s" && "$cuda" != failed* && "$summary" != *failed* && "$summary" != *error* && "$summary" == *passed* ]]; then
      verdict=PASS
    fi
    [[ -n "$cuda_version" ]] && torch_version="$torch_version (CUDA $cuda_version)"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$python_version" "$torch_version" "$install" \
    "$build" "$cuda" "$mode" "$tests" "$verdict" >>"$RESULTS"
  tail -1 "$RESULTS"
  rm -rf "$work/venv" "$work/torch_extensions"  # several GB each; the log and junit stay
}

for combo in "${COMBOS[@]}"; do
  IFS=: read -r python_version torch_version mode <<<"$combo"
  row "$python_version" "$torch_version" "${mode:-core}"
done

{
  echo "Run on $(date -u +%Y-%m-%d) at commit $COMMIT, $(uname -m), $(nproc) cores, no GPU."
  echo
  echo "| Python | torch | install | CPU kernel build | CUDA compile check | tests | result | verdict |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  while IFS=$'\t' read -r p t i b c m s v; do
    echo "| $p | $t | $i | $b | $c | $m | $s | $v |"
  done <"$RESULTS"
} | tee "$MATRIX_DIR/table.md"
