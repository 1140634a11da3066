"""Every example runs (--smoke) as a user would start it."""

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import REPO, SHARED_DATA

OMNIGLOT = SHARED_DATA / "omniglot"

EXAMPLES = {
    "sinusoid": ["examples/sinusoid.py", "--plot", "{tmp}/fits.png"],
    "higher": ["examples/maml_higher.py", "--data-root", str(OMNIGLOT)],
    "torchmeta": ["examples/maml_omniglot_torchmeta.py", "--folder", str(OMNIGLOT / "torchmeta")],
    "learn2learn": ["examples/maml_omniglot_learn2learn.py", "--data-root", str(OMNIGLOT)],
    "torchmeta --batched": [
        "examples/maml_omniglot_torchmeta.py",
        "--folder",
        str(OMNIGLOT / "torchmeta"),
        "--batched",
    ],  # fmt: skip
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_runs(name, tmp_path):
    if name != "sinusoid" and not OMNIGLOT.exists():
        pytest.skip(f"no Omniglot at {OMNIGLOT}")
    if name.startswith("torchmeta") and importlib.util.find_spec("torchmeta") is None:
        pytest.skip("torchmeta 1.8.0 is not installed (pip install --no-deps torchmeta==1.8.0)")
    args = [a.format(tmp=tmp_path) for a in EXAMPLES[name]]
    result = subprocess.run(
        [sys.executable, *args, "--smoke"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr
    if name == "sinusoid":
        assert (tmp_path / "fits.png").stat().st_size > 10_000
        assert lines[-2].startswith("meta-test MSE: 0 steps")
    else:
        assert "accuracy" in lines[-1]
