"""Optional ahead-of-time build of the native kernels.

By default mamlext installs as pure Python and JIT-compiles its kernels on first use.
``MAMLEXT_BUILD_NATIVE=1 pip install --no-build-isolation .`` compiles them now instead;
``--no-build-isolation`` builds against the torch already installed, whose ABI the kernels
must match. The CUDA kernel is built too when torch is a CUDA build, nvcc is found and the
GPU architectures are known: ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``), or else those
of the GPUs visible. On a machine without a GPU (a CI box, a login node) and without
``TORCH_CUDA_ARCH_LIST`` it is left out, with a message: the JIT build then compiles it on
the GPU machine at first use, for that GPU.
"""

import glob
import os

from setuptools import setup


def sources(device_type):
    """Every source file of mamlext/csrc/<device_type>/, as mamlext/ops/native.py builds."""
    folder = os.path.join("mamlext", "csrc", device_type)
    return sorted(
        glob.glob(os.path.join(folder, "*.cpp")) + glob.glob(os.path.join(folder, "*.cu"))
    )


def cuda_architectures_known(torch, cuda_home) -> bool:
    """Whether to build the CUDA kernel: a CUDA torch, nvcc, and architectures to build for.

    torch takes them from ``TORCH_CUDA_ARCH_LIST`` or, unset, from the visible GPUs; with
    neither it has none (and torch <= 2.15 fails with an IndexError), so CUDA is left out.
    """
    if torch.version.cuda is None or cuda_home is None:
        return False
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or torch.cuda.is_available():
        return True
    print(
        "mamlext: the CUDA kernel is not built ahead of time: no GPU is visible and "
        "TORCH_CUDA_ARCH_LIST is unset, so there is no GPU architecture to build for. Set "
        'TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") to build it here, or let the JIT build compile '
        "it on the GPU machine at first use."
    )
    return False


def native_extensions():
    if os.environ.get("MAMLEXT_BUILD_NATIVE", "") not in ("1", "true", "yes"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    csrc = os.path.join("mamlext", "csrc")
    extensions = [
        CppExtension(
            "mamlext._native_cpu",
            sources("cpu"),
            include_dirs=[os.path.abspath(csrc)],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    if cuda_architectures_known(torch, CUDA_HOME):
        extensions.append(
            CUDAExtension(
                "mamlext._native_cuda",
                sources("cuda"),
                include_dirs=[os.path.abspath(csrc)],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )
    return extensions, {"build_ext": BuildExtension}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
