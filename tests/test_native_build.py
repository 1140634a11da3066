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
        import mamlext.ops._native as native
        assert native._status["cpu"].library is None
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
        import mamlext.ops._native as native
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
