"""The built wheel, installed (not editable) in a clean venv, JIT-builds its kernel."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.test_native_build import CHECK_VALUES, status_line

IGNORED = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")


def run(*args: str | Path, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_the_wheel_installed_in_a_clean_venv_builds_its_kernel(tmp_path):
    # Build from a copy of the sources: a stale build/ in the repo cannot leak into the wheel.
    source = tmp_path / "source"
    shutil.copytree(REPO / "mamlext", source / "mamlext", ignore=IGNORED)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAMLEXT_BUILD_NATIVE")}
    dist = tmp_path / "dist"
    python = sys.executable
    run(python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, source,
        cwd=tmp_path, env=env)  # fmt: skip
    [wheel] = dist.glob("mamlext-*.whl")

    # Every kernel source, in whatever subfolder, must ship: the JIT build compiles them.
    csrc = REPO / "mamlext" / "csrc"
    sources = {
        path.relative_to(REPO).as_posix()
        for path in csrc.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert len(sources) >= 3, sources  # the header, the CPU and the CUDA kernel at least
    missing = sources - set(zipfile.ZipFile(wheel).namelist())
    assert not missing, f"not in the wheel (pyproject.toml's package-data): {sorted(missing)}"

    # A clean venv with the running torch (as the Makefile installs it), then the wheel.
    venv = tmp_path / "venv"
    run(python, "-m", "venv", venv, cwd=tmp_path, env=env)
    venv_python = venv / "bin" / "python"
    torch_version = torch.__version__.split("+")[0]
    # The exact torch that runs is the one constraint: a site-wide pip constraint file (this
    # project's machines cap torch at 2.14.1) would refuse a newer one.
    pinned = {**env, "PIP_CONSTRAINT": os.devnull}
    run(venv_python, "-m", "pip", "install", "--quiet", f"torch=={torch_version}",
        cwd=tmp_path, env=pinned)  # fmt: skip
    run(venv_python, "-m", "pip", "install", "--quiet", wheel, cwd=tmp_path, env=env)

    # Outside the repo, with an empty extension cache: the kernel compiles from the venv.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check_env = {**env, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "MAMLEXT_NO_NATIVE": ""}
    code = CHECK_VALUES + "print('FROM', mamlext.__file__)\n"
    result = run(venv_python, "-c", code, cwd=elsewhere, env=check_env)
    [imported] = [line[5:] for line in result.stdout.splitlines() if line.startswith("FROM ")]
    assert Path(imported).resolve().is_relative_to(venv.resolve()), imported
    assert status_line(result.stdout) == "STATUS native | compiled", result.stderr
