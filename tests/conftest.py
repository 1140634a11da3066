import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MAMLEXT_SHARED_DATA", REPO.parent / "shared" / "data"))

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def run_python(
    code: str, env: dict | None = None, timeout: float = 600, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the same venv) and return the finished process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )
