"""The JIT build, its cache, concurrent builds, the fallback, and what backend_info says."""

import textwrap

import pytest

from tests.conftest import run_python

CHECK_VALUES = textwrap.dedent(
    """
    import torch, mamlext
    p = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    g = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    out = mamlext.fused_sgd(p, g, 0.25)
    torch.testing.assert_close(out, [a - 0.25 * b for a, b in zip(p, g)])
    s = mamlext.backend_info()["cpu"]
    print("STATUS", s.kernel, "|", s.reason)
    """
)


def status_line(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("STATUS")]
    assert lines, stdout
    return lines[-1]


@pytest.mark.slow
def test_jit_build_from_empty_cache_then_cached(tmp_path):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path), "MAMLEXT_NO_NATIVE": ""}
    first = run_python(CHECK_VALUES, env)
    assert first.returncode == 0, first.stderr
    assert status_line(first.stdout) == "STATUS native | compiled"
    assert "mamlext: compiling the native cpu kernel" in first.stderr
    assert list(tmp_path.glob("mamlext_cpu/*.so")), "no library in the requested cache dir"

    second = run_python(CHECK_VALUES, env)
    assert second.returncode == 0, second.stderr
    assert status_line(second.stdout) == "STATUS native | loaded from cache"
    assert "compiling" not in second.stderr


@pytest.mark.slow
def test_two_processes_building_at_once_share_one_cache(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "MAMLEXT_NO_NATIVE": ""}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHECK_VALUES],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    for code, out, err in results:
        assert code == 0, err
        assert status_line(out).startswith("STATUS native |"), out
    # A third process finds the finished build.
    third = run_python(
        CHECK_VALUES, {"TORCH_EXTENSIONS_DIR": str(tmp_path), "MAMLEXT_NO_NATIVE": ""}
    )
    assert status_line(third.stdout) == "STATUS native | loaded from cache", third.stderr


def test_reference_path_with_native_disabled():
    code = CHECK_VALUES + textwrap.dedent(
        """
        from torch.autograd import gradcheck, gradgradcheck
        x = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        lr = torch.rand(2, 1, dtype=torch.float64, requires_grad=True)
        f = lambda p, g, lr: tuple(mamlext.fused_sgd([p], [g], [lr]))
        assert gradcheck(f, x[:2] + [lr]) and gradgradcheck(f, x[:2] + [lr])
        # A float rate beside a learned one (the Python rule alone cannot route that).
        mixed = lambda p, g, q, lr: tuple(mamlext.fused_sgd([p, q], [g, g], [0.3, lr]))
        assert gradcheck(mixed, x + [lr]) and gradgradcheck(mixed, x + [lr])
        assert mamlext.backend_info()["cpu"].library is None
        """
    )
    result = run_python(code, {"MAMLEXT_NO_NATIVE": "1"})
    assert result.returncode == 0, result.stderr
    assert status_line(result.stdout) == "STATUS reference | disabled by MAMLEXT_NO_NATIVE=1"
    assert "compiling" not in result.stderr


def test_failed_build_falls_back_with_one_warning_naming_the_cause(tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++ at all;\n")
    code = (
        textwrap.dedent(
            f"""
        import warnings
        import mamlext.ops.native as native
        from pathlib import Path
        native.SOURCES["cpu"] = [Path({str(broken)!r})]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
        """
        )
        + textwrap.indent(CHECK_VALUES + "\nout = mamlext.fused_sgd(p, g, 0.5)\n", "    ")
        + textwrap.dedent(
            """
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        print("WARNINGS", len(messages))
        print(messages[0])
        """
        )
    )
    result = run_python(
        code, {"TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "MAMLEXT_NO_NATIVE": ""}
    )
    assert result.returncode == 0, result.stderr
    assert "WARNINGS 1" in result.stdout, result.stdout
    assert "native cpu kernel is unavailable (build failed:" in result.stdout
    assert "error" in result.stdout.lower()  # the compiler's own message is quoted
    assert status_line(result.stdout).startswith("STATUS reference | build failed:")
    # The next process (another rank, another test) does not compile again: it remembers.
    again = run_python(
        code, {"TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "MAMLEXT_NO_NATIVE": ""}
    )
    assert again.returncode == 0, again.stderr
    assert "compiling" not in again.stderr
    assert "WARNINGS 1" in again.stdout and "remembered from an earlier process" in again.stdout
    # Other sources are another build: it is tried.
    broken.write_text("still not C++;\n")
    third = run_python(
        code, {"TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "MAMLEXT_NO_NATIVE": ""}
    )
    assert "compiling" in third.stderr and "remembered" not in third.stdout


def test_a_kernel_that_loads_but_cannot_run_is_replaced_by_the_reference():
    """A library built for other GPUs loads and fails at its first launch: the trial call
    at load time finds it (simulated here on the CPU with wrong values), the reference is
    registered over it, one warning names the cause, and results stay right."""
    code = textwrap.dedent(
        """
        import warnings
        import torch
        import mamlext.ops.native as native

        class WrongEquals:  # the trial's check sees wrong values
            def __getattr__(self, name):
                return (lambda a, b: False) if name == "equal" else getattr(torch, name)

        native.torch = WrongEquals()
        import mamlext
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = [torch.randn(5, dtype=torch.float64)]
            g = [torch.randn(5, dtype=torch.float64)]
            out = mamlext.fused_sgd(p, g, 0.5)
        torch.testing.assert_close(out[0], p[0] - 0.5 * g[0])
        print("WARNINGS", len([w for w in caught if issubclass(w.category, RuntimeWarning)]))
        status = mamlext.backend_info()["cpu"]
        print("STATUS", status.kernel, "|", status.reason)
        dump = torch._C._dispatch_dump("mamlext::fused_sgd")
        print("SERVING", [line for line in dump.splitlines() if line.startswith("CPU:")])
        """
    )
    result = run_python(code, {"MAMLEXT_NO_NATIVE": ""})
    assert result.returncode == 0, result.stderr
    assert "WARNINGS 1" in result.stdout
    assert "STATUS reference | cannot run here: the cpu kernel was built but its trial call" in (
        result.stdout
    )
    serving = next(line for line in result.stdout.splitlines() if line.startswith("SERVING"))
    assert "native.py" in serving and "fused_sgd.cpp" not in serving, serving


def test_required_native_kernel_that_does_not_serve_is_an_error():
    code = textwrap.dedent(
        """
        import torch, mamlext
        from mamlext.ops.native import NativeKernelMissing
        print("INFO", mamlext.backend_info()["cpu"].kernel)  # reporting never raises
        try:
            mamlext.fused_sgd([torch.zeros(2)], [torch.ones(2)], 0.5)
        except NativeKernelMissing as error:
            print("RAISED", error)
        """
    )
    result = run_python(code, {"MAMLEXT_NO_NATIVE": "1", "MAMLEXT_REQUIRE_NATIVE": "1"})
    assert result.returncode == 0, result.stderr
    assert "INFO reference" in result.stdout
    assert "RAISED mamlext: MAMLEXT_REQUIRE_NATIVE=1, but the native cpu kernel" in result.stdout
    assert "disabled by MAMLEXT_NO_NATIVE=1" in result.stdout
    served = run_python(CHECK_VALUES, {"MAMLEXT_NO_NATIVE": "", "MAMLEXT_REQUIRE_NATIVE": "1"})
    assert served.returncode == 0, served.stderr  # the native kernel serves: no error
    assert status_line(served.stdout).startswith("STATUS native |")


@pytest.mark.slow
def test_ahead_of_time_build_is_loaded_instead_of_a_jit_build(tmp_path):
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    copy = tmp_path / "src"
    copy.mkdir()
    shutil.copytree(
        REPO / "mamlext", copy / "mamlext", ignore=shutil.ignore_patterns("__pycache__", "*.so")
    )
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, copy / name)
    env = {**__import__("os").environ, "MAMLEXT_BUILD_NATIVE": "1"}
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    assert list((copy / "mamlext").glob("_native_cpu*.so"))
    # Run in the copy: its mamlext comes first on sys.path (before the editable install).
    code = CHECK_VALUES + "print('FROM', mamlext.__file__)\n"
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "jit"), "MAMLEXT_NO_NATIVE": ""}
    result = run_python(code, env, cwd=copy)
    assert result.returncode == 0, result.stderr
    assert str(copy) in result.stdout  # the copy, not the editable install
    assert status_line(result.stdout) == "STATUS native | ahead-of-time build"
    assert not (tmp_path / "jit").exists()  # nothing was JIT-compiled
