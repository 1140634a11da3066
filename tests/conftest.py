import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MAMLEXT_SHARED_DATA", REPO.parent / "shared" / "data"))

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


# MAMLEXT_TEST_DEVICE=cpu: the rehearsal of scripts/gpu/check.sh on a machine without a GPU
# runs the tests marked any_device (tests/test_cuda.py) on that device instead of skipping.
TEST_DEVICE = os.environ.get("MAMLEXT_TEST_DEVICE", "cuda")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        rehearsed = TEST_DEVICE != "cuda" and "any_device" in item.keywords
        if "cuda" in item.keywords and not rehearsed:
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
