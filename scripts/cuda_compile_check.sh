#!/usr/bin/env bash
# Compile-check the CUDA library of mamlext::fused_sgd (every source in mamlext/csrc/cuda/)
# without a GPU: build it with torch.utils.cpp_extension.load exactly as
# mamlext/ops/_native.py does (same include path and nvcc flags, plus -Xptxas=-v) into a
# fresh temporary directory, and report ptxas' register/spill usage of the kernel.
#
# usage: scripts/cuda_compile_check.sh PYTHON
#   PYTHON: an interpreter whose torch is a CUDA build (and which has ninja).
#
# Prints "SKIP: ..." and exits 0 when there is no nvcc or PYTHON's torch is CPU-only;
# prints "OK: ..." and exits 0 when the kernel compiles and links; otherwise prints the
# compiler output and exits 1. Environment (each kept if already set): CUDA_HOME
# (default /usr/local/cuda when it has bin/nvcc, else derived from nvcc), TORCH_CUDA_ARCH_LIST
# (default 9.0), CUDA_INC_PATH (default <site-packages>/nvidia/cu13/include when present,
# for the cusparse.h that ATen/cuda/CUDAContext.h includes). With torch's CUDA 12 wheels the
# library headers lie in <site-packages>/nvidia/<library>/include instead: those of the
# libraries torch's headers include (cuBLAS, cuSPARSE, cuSOLVER, cuRAND, cuFFT) are added to
# the include path, as a full toolkit's CUDA_HOME/include would hold them.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 PYTHON" >&2
  exit 2
fi
PYTHON=$1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SOURCE="$REPO/mamlext/csrc/cuda"
CSRC="$REPO/mamlext/csrc"

# --- nvcc ---------------------------------------------------------------------------
NVCC=""
if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
  NVCC="$CUDA_HOME/bin/nvcc"
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
  NVCC=/usr/local/cuda/bin/nvcc
  export CUDA_HOME=/usr/local/cuda
elif NVCC=$(command -v nvcc); then
  # (may be a wrapper script; then set CUDA_HOME yourself)
  export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}
else
  echo "SKIP: CUDA compile check: no nvcc"
  exit 0
fi
export CUDA_HOME
NVCC_VERSION=$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9.]*\).*/\1/p')

# --- torch ----------------------------------------------------------------------------
if ! TORCH_INFO=$("$PYTHON" -c 'import os, torch; print(torch.__version__, torch.version.cuda, os.path.dirname(os.path.dirname(torch.__file__)))'); then
  echo "FAIL: CUDA compile check: cannot import torch with $PYTHON" >&2
  exit 1
fi
read -r TORCH_VERSION TORCH_CUDA SITE_PACKAGES <<<"$TORCH_INFO"
if [[ "$TORCH_CUDA" == "None" ]]; then
  echo "SKIP: CUDA compile check: $PYTHON has a CPU-only torch"
  exit 0
fi

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [[ -z "${CUDA_INC_PATH:-}" && -d "$SITE_PACKAGES/nvidia/cu13/include" ]]; then
  export CUDA_INC_PATH="$SITE_PACKAGES/nvidia/cu13/include"
fi

BUILD_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mamlext_cuda_compile_check.XXXXXX")
trap 'rm -rf "$BUILD_DIR"' EXIT
LOG="$BUILD_DIR/build.log"

echo "CUDA compile check: nvcc $NVCC_VERSION ($NVCC), torch $TORCH_VERSION (CUDA $TORCH_CUDA)," \
  "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, CUDA_INC_PATH=${CUDA_INC_PATH:-<unset>}"

# Build only: load() compiles, links, then dlopens the library; the dlopen (and the
# kernel registration it runs) may fail on a machine without a CUDA driver, so a load
# error counts as success when the .so was produced.
set +e
"$PYTHON" - "$SOURCE" "$CSRC" "$BUILD_DIR" >"$LOG" 2>&1 <<'PY'
import glob
import os
import sys

from torch.utils import cpp_extension

source_dir, csrc, build_dir = sys.argv[1:]
import torch

site = os.path.dirname(os.path.dirname(torch.__file__))
libraries = [
    os.path.join(site, "nvidia", name, "include")
    for name in ("cublas", "cusparse", "cusolver", "curand", "cufft")
    if os.path.isdir(os.path.join(site, "nvidia", name, "include"))
]
# The same rule as mamlext/ops/_native.py: every .cu/.cpp file of csrc/cuda/.
sources = sorted(glob.glob(os.path.join(source_dir, "*.cu")) + glob.glob(os.path.join(source_dir, "*.cpp")))
try:  # a venv's ninja is not on PATH unless the venv is active
    import ninja

    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
except ImportError:
    pass

try:
    cpp_extension.load(
        name="mamlext_cuda_compile_check",
        sources=sources,
        extra_include_paths=[csrc, *libraries],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-Xptxas=-v"],
        is_python_module=False,
        build_directory=build_dir,
        verbose=True,
    )
    print("compile-check: built and loaded")
except Exception as error:
    libraries = glob.glob(os.path.join(build_dir, "*.so"))
    if not libraries:
        raise
    print(f"compile-check: built {libraries[0]}; loading it failed "
          f"(expected without a GPU driver): {type(error).__name__}: {error}")
PY
STATUS=$?
set -e

if [[ $STATUS -ne 0 ]] || ! compgen -G "$BUILD_DIR/*.so" >/dev/null; then
  cat "$LOG"
  echo "FAIL: CUDA compile check: building $SOURCE failed (exit status $STATUS)" >&2
  exit 1
fi

# ptxas -v: one "Compiling entry function" line per kernel instantiation, followed by
# its stack/spill and register lines.
DEMANGLE=cat
if command -v c++filt >/dev/null; then DEMANGLE=c++filt; fi
echo "ptxas resource usage:"
grep -E "ptxas info *: (Compiling entry function|Used [0-9]+ registers)|bytes stack frame" "$LOG" \
  | sed -E "s/.*Compiling entry function '([^']*)' for '([^']*)'.*/\1 \2/" \
  | "$DEMANGLE" | sed -E 's/^(ptxas info *: )?/  /' || echo "  (no ptxas output found)"

# Warnings that come from this package's sources (torch's own headers are not ours).
WARNINGS=$(grep -iE "(fused_sgd\.(cu|h)|mamlext/csrc).*warning" "$LOG" || true)
if [[ -n "$WARNINGS" ]]; then
  echo "warnings in mamlext sources:"
  echo "$WARNINGS"
else
  echo "no compiler warnings in mamlext sources"
fi
grep -E "^compile-check: " "$LOG" | sed 's/^compile-check: /  /' || true
echo "OK: CUDA kernel compiled and linked (nvcc $NVCC_VERSION, torch $TORCH_VERSION)"
