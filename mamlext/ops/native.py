"""Which kernel serves ``mamlext::fused_sgd`` on each device type, and why.

The native kernels are C++/CUDA sources shipped inside the package (``mamlext/csrc``)
and JIT-compiled with ``torch.utils.cpp_extension`` + ninja on first use; the build is
cached in ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) and guarded
by torch's file lock, so concurrent first uses build once. A loaded library registers
its kernel with the dispatcher (``TORCH_LIBRARY_IMPL``), where it takes precedence over
the pure-PyTorch reference. Where the build fails, the reference serves and ONE
warning names the cause; ``MAMLEXT_NO_NATIVE=1`` skips native kernels altogether, and
``MAMLEXT_REQUIRE_NATIVE=1`` makes a missing one an error instead of a fallback.
Libraries built ahead of time (``MAMLEXT_BUILD_NATIVE=1 pip install``, see setup.py) are
loaded instead of a JIT build when present.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from mamlext.ops.reference import checked_reference_kernel

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# Every source file of csrc/<device type>/ goes into that device type's library.
SOURCES = {
    device: sorted([*(CSRC / device).glob("*.cpp"), *(CSRC / device).glob("*.cu")])
    for device in ("cpu", "cuda")
}
DISABLE_ENV = "MAMLEXT_NO_NATIVE"
REQUIRE_ENV = "MAMLEXT_REQUIRE_NATIVE"
VERBOSE_ENV = "MAMLEXT_BUILD_VERBOSE"


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """How ``fused_sgd`` is served on one device type.

    Attributes:
        device_type: ``"cpu"``, ``"cuda"``, ...
        kernel: ``"native"`` (C++/CUDA) or ``"reference"`` (pure PyTorch).
        reason: why: ``"compiled"``, ``"loaded from cache"``, ``"ahead-of-time build"``, ``"disabled by
            MAMLEXT_NO_NATIVE=1"``, ``"build failed: <compiler message>"``, ``"cannot run here:
            ..."`` (built for other GPUs, say), ...
        library: path of the loaded shared library, if any.
    """

    device_type: str
    kernel: str
    reason: str
    library: str | None = None


_status: dict[str, BackendStatus] = {}
FAILURES = ("build failed", "cannot run here")  # the reasons that warn: native was expected
_lock = threading.Lock()


def native_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def native_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class NativeKernelMissing(RuntimeError):
    """``MAMLEXT_REQUIRE_NATIVE=1`` and the native kernel of a device does not serve."""


def ensure_loaded(device_type: str, strict: bool = True) -> BackendStatus:
    """Load (building if needed) the native kernel for ``device_type``, once per process.

    Raises:
        NativeKernelMissing: ``strict``, ``MAMLEXT_REQUIRE_NATIVE=1`` and the reference
            serves a device that has native sources (a failed build, say): for runs that
            must not fall back silently, such as the GPU check (``scripts/gpu/check.sh``).
    """
    status = _status.get(device_type)
    if status is None:
        with _lock:
            status = _status.get(device_type)
            if status is None:
                status = _load(device_type)
                if status.kernel == "native":
                    status = _tried(status)
                _status[device_type] = status
                if status.kernel == "reference" and status.reason.startswith(FAILURES):
                    warnings.warn(
                        f"mamlext: the native {device_type} kernel is unavailable "
                        f"({status.reason}); using the pure-PyTorch reference instead. "
                        f"Set {DISABLE_ENV}=1 to silence this.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    if status.kernel != "native" and strict and device_type in SOURCES and native_required():
        raise NativeKernelMissing(
            f"mamlext: {REQUIRE_ENV}=1, but the native {device_type} kernel does not serve "
            f"fused_sgd: {status.reason}"
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
    return _jit_build(device_type)


def _tried(status: BackendStatus) -> BackendStatus:
    """``status`` if the loaded kernel runs on this device, else the reference's, serving.

    A CUDA library built for other GPU architectures loads, and fails only at the first
    launch ("no kernel image is available for execution on the device"): one call on four
    elements finds that at load time. The library's kernel stays registered (a loaded
    library cannot be unloaded), so the reference is registered over it for that device.
    Skipped while a CUDA graph is being captured (a trial would be captured with it).
    """
    device_type = status.device_type
    if device_type == "cuda" and torch.cuda.is_current_stream_capturing():
        return status
    try:
        with torch.no_grad():
            p = torch.arange(4.0, device=device_type)
            out = torch.ops.mamlext.fused_sgd([p], [torch.ones_like(p)], [None], [0.5])[0]
            if device_type == "cuda":
                torch.cuda.synchronize()
            if not torch.equal(out.cpu(), torch.arange(4.0) - 0.5):
                raise RuntimeError(f"wrong values: {out.tolist()} for p=[0, 1, 2, 3], g=1, lr=0.5")
    except Exception as error:
        _serve_reference(device_type)
        return BackendStatus(
            device_type, "reference",
            f"cannot run here: the {device_type} kernel was built but its trial call failed "
            f"({_summarise(error, max_lines=3)})",
            library=status.library,
        )  # fmt: skip
    return status


_overrides: list = []  # torch.library.Library objects: their registrations live with them


def _serve_reference(device_type: str) -> None:
    """Register the pure-PyTorch kernel for ``device_type`` over the native library's."""
    library = torch.library.Library("mamlext", "IMPL")
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    with warnings.catch_warnings():  # "overriding a previously registered kernel": intended
        warnings.simplefilter("ignore")
        library.impl("fused_sgd", checked_reference_kernel, dispatch_key)
    _overrides.append(library)


def _ahead_of_time_library(device_type: str) -> Path | None:
    """The library ``MAMLEXT_BUILD_NATIVE=1 pip install`` built (see setup.py), if any."""
    package = Path(__file__).resolve().parent.parent
    found = sorted(package.glob(f"_native_{device_type}*.so"))
    return found[0] if found else None


def _jit_build(device_type: str) -> BackendStatus:
    """Compile (or find cached) and load the library; a failure is remembered on disk.

    A failed build writes ``build_failed.json`` in the build folder, keyed by the sources,
    torch, Python and the flags: later processes (every rank of a distributed job, every
    test) take the reference at once instead of compiling again, until one of those
    changes or the file is deleted.
    """
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    name = f"mamlext_{device_type}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    sources = SOURCES[device_type]
    inputs = [*sources, *sorted(CSRC.rglob("*.h")), *sorted(CSRC.rglob("*.cuh"))]
    kwargs = _build_flags(device_type)
    failure = build_dir / FAILURE_NAME
    key = _build_key(inputs, kwargs)
    remembered = _remembered_failure(failure, key)
    if remembered is not None:
        return BackendStatus(
            device_type, "reference",
            f"build failed: {remembered} (remembered from an earlier process in {failure}; "
            "delete it to retry)",
        )  # fmt: skip
    try:
        return _compile_and_load(device_type, name, build_dir, sources, inputs, kwargs)
    except Exception as error:  # a compiler error, a missing ninja or nvcc, ...
        reason = _summarise(error)
        _remember_failure(failure, key, reason)
        return BackendStatus(device_type, "reference", f"build failed: {reason}")


FAILURE_NAME = "build_failed.json"


def _build_flags(device_type: str) -> dict:
    if device_type == "cpu":
        return dict(extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    return dict(extra_cflags=["-O3"], extra_cuda_cflags=["-O3"])


def _build_key(inputs: list[Path], kwargs: dict) -> str:
    """What a build's outcome depends on: sources, torch, Python, flags, the CUDA arch list."""
    digest = hashlib.sha256()
    for path in inputs:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    context = [torch.__version__, sys.version, repr(sorted(kwargs.items()))]
    context += [os.environ.get(v, "") for v in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CXX")]
    digest.update(json.dumps(context).encode())
    return digest.hexdigest()


def _remembered_failure(path: Path, key: str) -> str | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record.get("reason") if isinstance(record, dict) and record.get("key") == key else None


def _remember_failure(path: Path, key: str, reason: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "reason": reason}))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache: the next process tries again


def _compile_and_load(device_type, name, build_dir, sources, inputs, kwargs) -> BackendStatus:
    from torch.utils import cpp_extension

    built_before = _newest_library(build_dir)
    if built_before is None or any(s.stat().st_mtime > built_before for s in inputs):
        print(
            f"mamlext: compiling the native {device_type} kernel (first use only, "
            f"about a minute; cached in {build_dir})",
            file=sys.stderr,
            flush=True,
        )
    library = cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=os.environ.get(VERBOSE_ENV, "") == "1",  # the compiler's log (scripts/gpu/check.sh)
        **kwargs,
    )
    built_after = _newest_library(build_dir)
    (build_dir / FAILURE_NAME).unlink(missing_ok=True)
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
    info = {"cpu": ensure_loaded("cpu", strict=False)}
    if torch.cuda.is_available():
        info["cuda"] = ensure_loaded("cuda", strict=False)
    else:
        info["cuda"] = _status.get("cuda") or BackendStatus(
            "cuda", "reference", "no CUDA device on this machine"
        )
    return info
