"""Which kernel serves ``mamlext::fused_sgd`` on each device type, and why.

The native kernels are C++/CUDA sources shipped inside the package (``mamlext/csrc``)
and JIT-compiled with ``torch.utils.cpp_extension`` + ninja on first use; the build is
cached in ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) and guarded
by torch's file lock, so concurrent first uses build once. A loaded library registers
its kernel with the dispatcher (``TORCH_LIBRARY_IMPL``), where it takes precedence over
the pure-PyTorch reference. Where the build fails, the reference serves and ONE
warning names the cause; ``MAMLEXT_NO_NATIVE=1`` skips native kernels altogether.
Libraries built ahead of time (``MAMLEXT_BUILD_NATIVE=1 pip install``, see setup.py) are
loaded instead of a JIT build when present.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# Every source file of csrc/<device type>/ goes into that device type's library.
SOURCES = {
    device: sorted([*(CSRC / device).glob("*.cpp"), *(CSRC / device).glob("*.cu")])
    for device in ("cpu", "cuda")
}
DISABLE_ENV = "MAMLEXT_NO_NATIVE"


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """How ``fused_sgd`` is served on one device type.

    Attributes:
        device_type: ``"cpu"``, ``"cuda"``, ...
        kernel: ``"native"`` (C++/CUDA) or ``"reference"`` (pure PyTorch).
        reason: why: ``"compiled"``, ``"loaded from cache"``, ``"ahead-of-time build"``, ``"disabled by
            MAMLEXT_NO_NATIVE=1"``, ``"build failed: <compiler message>"``, ...
        library: path of the loaded shared library, if any.
    """

    device_type: str
    kernel: str
    reason: str
    library: str | None = None


_status: dict[str, BackendStatus] = {}
_lock = threading.Lock()


def native_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def ensure_loaded(device_type: str) -> BackendStatus:
    """Load (building if needed) the native kernel for ``device_type``, once per process."""
    status = _status.get(device_type)
    if status is None:
        with _lock:
            status = _status.get(device_type)
            if status is None:
                status = _load(device_type)
                _status[device_type] = status
                if status.kernel == "reference" and status.reason.startswith("build failed"):
                    warnings.warn(
                        f"mamlext: the native {device_type} kernel is unavailable "
                        f"({status.reason}); using the pure-PyTorch reference instead. "
                        f"Set {DISABLE_ENV}=1 to silence this.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return status


def _load(device_type: str) -> BackendStatus:
    if device_type not in SOURCES:
        return BackendStatus(device_type, "reference", "no native kernel for this device type")
    if native_disabled():
        return BackendStatus(device_type, "reference", f"disabled by {DISABLE_ENV}=1")
    if device_type == "cuda" and torch.version.cuda is None:
        return BackendStatus(device_type, "reference", "this torch build has no CUDA support")
    prebuilt = _ahead_of_time_library(device_type)
    if prebuilt is not None:
        torch.ops.load_library(str(prebuilt))
        return BackendStatus(device_type, "native", "ahead-of-time build", library=str(prebuilt))
    try:
        return _jit_build(device_type)
    except Exception as error:  # a compiler error, a missing ninja or nvcc, ...
        return BackendStatus(device_type, "reference", f"build failed: {_summarise(error)}")


def _ahead_of_time_library(device_type: str) -> Path | None:
    """The library ``MAMLEXT_BUILD_NATIVE=1 pip install`` built (see setup.py), if any."""
    package = Path(__file__).resolve().parent.parent
    found = sorted(package.glob(f"_native_{device_type}*.so"))
    return found[0] if found else None


def _jit_build(device_type: str) -> BackendStatus:
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    name = f"mamlext_{device_type}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    sources = SOURCES[device_type]
    built_before = _newest_library(build_dir)
    inputs = [*sources, *CSRC.glob("*.h")]
    if built_before is None or any(s.stat().st_mtime > built_before for s in inputs):
        print(
            f"mamlext: compiling the native {device_type} kernel (first use only, "
            f"about a minute; cached in {build_dir})",
            file=sys.stderr,
            flush=True,
        )
    flags = ["-O3"]
    kwargs: dict = {}
    if device_type == "cpu":
        kwargs = dict(extra_cflags=[*flags, "-fopenmp"], extra_ldflags=["-fopenmp"])
    else:
        kwargs = dict(extra_cflags=flags, extra_cuda_cflags=["-O3"])
    library = cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=False,
        **kwargs,
    )
    built_after = _newest_library(build_dir)
    reason = "compiled" if built_after != built_before else "loaded from cache"
    return BackendStatus(device_type, "native", reason, library=str(library))


def _newest_library(build_dir: Path) -> float | None:
    times = [p.stat().st_mtime for p in build_dir.glob("*.so")] if build_dir.exists() else []
    return max(times, default=None)


def _put_ninja_on_path() -> None:
    # A venv's ninja lives in its bin/, which is not on PATH unless the venv is active.
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _summarise(error: BaseException, max_lines: int = 12) -> str:
    text = str(error)
    output = getattr(error, "output", None)
    if isinstance(output, bytes | str) and output:
        text = output.decode(errors="replace") if isinstance(output, bytes) else output
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-max_lines:]) or type(error).__name__


def backend_info() -> dict[str, BackendStatus]:
    """Load the native kernels this machine can serve and report each device type.

    Returns:
        ``{"cpu": BackendStatus, "cuda": BackendStatus}``; CUDA is reported as
        ``reference`` with the reason when no CUDA device is present.
    """
    info = {"cpu": ensure_loaded("cpu")}
    if torch.cuda.is_available():
        info["cuda"] = ensure_loaded("cuda")
    else:
        info["cuda"] = _status.get("cuda") or BackendStatus(
            "cuda", "reference", "no CUDA device on this machine"
        )
    return info
