"""The CUDA kernel's device code, run on the CPU: every block and thread of real launches.

nvcc compiles host code without a GPU, and the kernel's per-thread work
(``fused_sgd_thread`` in ``mamlext/csrc/cuda/fused_sgd_kernel.cuh``) and its launch planner
are ``__host__ __device__``/host functions. ``tests/csrc/emulated_grid.cu`` drives them over
emulated grids (chunk boundaries, vector tails, misaligned views, 55/56/57/113 tensors, every
dtype and rate layout) against ``p - lr * g`` in double. What remains for a GPU is the launch
itself and the memory system (``tests/test_cuda.py``).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

from tests.conftest import REPO


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME, /usr/local/cuda or PATH (as scripts/cuda_compile_check.sh)."""
    for candidate in (
        Path(os.environ.get("CUDA_HOME", "/nonexistent")) / "bin" / "nvcc",
        Path("/usr/local/cuda/bin/nvcc"),
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("nvcc")


@pytest.mark.slow
@pytest.mark.nvcc
def test_device_code_over_emulated_grids_equals_the_float64_oracle(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc on this machine (CUDA_HOME, /usr/local/cuda or PATH)")
    binary = tmp_path / "emulated_grid"
    command = [
        nvcc, "-std=c++17", "-O2", "-arch=sm_90",
        # torch's c10::BFloat16 converts through a cast from unsigned short to __nv_bfloat16
        # when nvcc compiles the host side: without this, gcc's -O2 miscompiles it (measured).
        "-Xcompiler", "-fno-strict-aliasing",
        f"-I{REPO / 'mamlext' / 'csrc'}", *[f"-I{path}" for path in include_paths()],
        str(REPO / "tests" / "csrc" / "emulated_grid.cu"), "-o", str(binary),
    ]  # fmt: skip
    build = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.rstrip().endswith("OK"), run.stdout[-4000:]
    cases = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
    assert len(cases) == 4 * (4 * 7 + 4 + 4 + 4), run.stdout  # every case of every dtype
