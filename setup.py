"""Optional ahead-of-time build of the native kernels.

By default mamlext installs as pure Python and JIT-compiles its kernels on first use.
``MAMLEXT_BUILD_NATIVE=1 pip install --no-build-isolation .`` compiles them now instead
(the CUDA kernel too when torch is a CUDA build and nvcc is found); ``--no-build-isolation``
builds against the torch already installed, whose ABI the kernels must match.
"""

import glob
import os

from setuptools import setup


def sources(device_type):
    """Every source file of mamlext/csrc/<device_type>/, as mamlext/ops/_native.py builds."""
    folder = os.path.join("mamlext", "csrc", device_type)
    return sorted(
        glob.glob(os.path.join(folder, "*.cpp")) + glob.glob(os.path.join(folder, "*.cu"))
    )


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
    if torch.version.cuda is not None and CUDA_HOME is not None:
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
