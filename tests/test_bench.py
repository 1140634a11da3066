"""The peer benchmark on its tiny config: every worker returns numbers, and the peers that
compute the exact MAML meta-gradient agree with higher. No assertion about time."""

import csv
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mamlext
from mamlext import bench
from mamlext.bench import op, report
from mamlext.bench.cli import DEFAULT_OUT

# torchmeta is optional (README: installed with --no-deps); without it its row says so.
HAS_TORCHMETA = importlib.util.find_spec("torchmeta") is not None
PEERS = (
    "higher", "mamlext", "foreach loop", "torchmeta", "torchopt", "mamlext (checkpoint auto)",
    "mamlext (nn.Module, vmap)", "mamlext (nn.Module, per-task)",
)  # fmt: skip
EXACT_PEERS = [p for p in PEERS if p != "torchmeta" or HAS_TORCHMETA]
# One thread: the numbers of every worker (and the cached reference) come from the same
# arithmetic, and a busy machine does not stall the OpenMP threads.
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    ref_dir = str(tmp_path_factory.mktemp("reference"))
    measured = [
        bench.run_worker("tiny", peer, "cpu", warmup=1, repeats=2, ref_dir=ref_dir, env=ENV)
        for peer in PEERS  # higher first: it caches the reference gradient
    ]
    return {r["peer"]: r for r in bench.add_speedups(measured)}


def test_every_peer_measured(rows):
    if not HAS_TORCHMETA:
        assert rows["torchmeta"]["status"] == "unavailable", rows["torchmeta"]
    for peer in EXACT_PEERS:
        row = rows[peer]
        assert row["status"] == "ok" and "error" not in row, row
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, row
        assert math.isfinite(row["peak_mb"]) and row["peak_mb"] >= 0, row
        assert row["speedup"] is not None, row
    assert rows["mamlext"]["path"] in ("batched", "per-task")
    assert rows["mamlext (nn.Module, vmap)"]["path"] == "batched, nn.Module"
    assert rows["mamlext (nn.Module, per-task)"]["path"] == "per-task, nn.Module"


def test_meta_gradients_agree_with_higher(rows):
    assert rows["higher"]["err_f32"] == 0  # a second run of higher, bit for bit
    for peer in EXACT_PEERS[1:]:
        assert rows[peer]["err_f32"] < 1e-4, rows[peer]


def test_outputs(rows, tmp_path):
    table = bench.markdown(list(rows.values()))
    assert table.count("\n") == len(rows) + 1 and "**" in table  # the best one is marked
    bench.write_csv(list(rows.values()), tmp_path / "maml.csv")
    assert len((tmp_path / "maml.csv").read_text().splitlines()) == len(rows) + 1
    bench.plot(list(rows.values()), tmp_path / "maml.png", "tiny")
    assert (tmp_path / "maml.png").stat().st_size > 0


def test_failures_become_rows():
    row = bench.run_worker("tiny", "higher", "cpu", 0, 1, timeout=0.01)
    assert row["status"] == "error" and "timed out" in row["error"]


def test_learn2learn_row_says_what_is_installed():
    # learn2learn does not build on Python 3.11 (Cython); where it is missing, the row says so.
    row = bench.run_worker("tiny", "learn2learn", "cpu", 0, 1, env=ENV)
    if importlib.util.find_spec("learn2learn") is None:
        assert row["status"] == "unavailable", row
        assert "learn2learn" in row["error"], row
    else:
        assert row["status"] == "ok" and "error" not in row, row


def test_quick_plan():
    pairs = bench.plan(quick=True)
    assert {c for c, _ in pairs} == set(bench.QUICK_CONFIGS)
    assert [p for c, p in pairs if c == "C"][0] == "higher"
    assert {c for c, p in pairs if p == "torch.func"} == {"A"}
    with pytest.raises(ValueError, match="unknown"):
        bench.plan(quick=True, peers=["nope"])


def test_best_is_the_fastest_exact_peer():
    rows = [
        {"config": "A", "peer": "higher", "median_ms": 10.0, "err_f32": 0.0},
        {"config": "A", "peer": "torch.func", "median_ms": 2.0, "err_f32": 1e-2},
        {"config": "A", "peer": "mamlext", "median_ms": 5.0, "err_f32": 1e-7},
        {"config": "A", "peer": "torchmeta", "status": "error", "error": "timed out"},
    ]
    by_peer = {r["peer"]: r for r in bench.add_speedups(rows)}
    assert by_peer["torch.func"]["speedup"] == 5.0 and not by_peer["torch.func"]["best"]
    assert by_peer["mamlext"]["best"] and by_peer["mamlext"]["speedup"] == 2.0
    assert by_peer["torchmeta"]["speedup"] is None
    assert "timed out" in bench.markdown(rows)


def test_package_line_names_the_commit_of_a_checkout_only(tmp_path):
    assert report.package_line(tmp_path) == f"mamlext {mamlext.__version__}"
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "first"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert report.package_line(tmp_path) == f"mamlext {mamlext.__version__} (commit {head})"


@pytest.mark.slow
def test_runs_from_a_copy_outside_any_checkout(tmp_path):
    """The benchmark imported from a bare copy of the package (as from a wheel): it writes
    its table under the current directory and names the version without a commit."""
    site, cwd = tmp_path / "site", tmp_path / "run"
    shutil.copytree(
        Path(mamlext.__file__).parent,
        site / "mamlext",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    cwd.mkdir()
    command = [sys.executable, "-m", "mamlext.bench", "--quick", "--configs", "tiny"]
    command += ["--peers", "higher", "mamlext", "--skip-op", "--timeout", "300"]
    # MAMLEXT_NO_NATIVE: the copied C++ sources would start a JIT build; not what is tested.
    env = {**os.environ, **ENV, "PYTHONPATH": str(site), "MAMLEXT_NO_NATIVE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = cwd / DEFAULT_OUT  # the default --out, relative to the current folder
    page = (out / "maml_cpu.md").read_text()
    assert f"mamlext {mamlext.__version__}, torch " in page, page
    assert "| tiny | higher |" in page and "| tiny | mamlext |" in page, page
    with open(out / "maml_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["peer"] for r in rows] == ["higher", "mamlext"]
    for r in rows:
        assert r["status"] == "ok" and r["note"] == "" and float(r["median_ms"]) > 0, r
        assert float(r["err_f32"]) < 1e-4, r
    assert (out / "maml_cpu.png").stat().st_size > 0
    assert not (out / "op_cpu.md").exists()


def test_op_benchmark_writes_csv_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setattr(op, "CONFIGS", [("conv4", op.conv4_shapes(filters=4), 2)])  # small
    csv_path, md_path = tmp_path / "op.csv", tmp_path / "op.md"
    op.main(["--device", "cpu", "--quick", "--csv", str(csv_path), "--markdown", str(md_path)])
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(op.COLUMNS)
    assert len(rows) == len(op.MODES) * len(op.VARIANTS)
    assert all(float(r["median_ms"]) > 0 for r in rows)
    page = md_path.read_text()
    assert "  \ndtype: float32, quick: True\n\n| config | T | elements |" in page, page
    assert page.count("\n| conv4 | 2 |") == len(rows)


def _stat(pid: int | str) -> list[str]:
    """``/proc/PID/stat`` after the command name: state, ppid, ..., utime at index 11."""
    return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def _running(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"  # a zombie no longer runs
    except OSError:
        return False


def _load_pids(parent: int) -> list[int]:
    """Pids of the running load processes whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            ppid, cmdline = int(_stat(entry.name)[1]), (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"torch.set_num_threads(1)" in cmdline:
            found.append(int(entry.name))
    return [pid for pid in found if _running(pid)]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_background_load_runs_busy_processes_and_stops_them():
    from mamlext.bench import load

    with load.background_load(2):
        time.sleep(2.0)
        pids = _load_pids(os.getpid())
        assert len(pids) == 2
        assert all(int(_stat(p)[11]) > 0 for p in pids)  # busy: user CPU time by now
    assert _load_pids(os.getpid()) == []
    assert "2 single-threaded torch process" in load.describe(2)
    with pytest.raises(ValueError, match="--load must be >= 0"), load.background_load(-1):
        pass


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_load_processes_exit_when_the_benchmark_is_killed():
    script = "import time\nfrom mamlext.bench import load\nwith load.background_load(1):\n"
    script += "    print('up', flush=True)\n    time.sleep(600)\n"
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "up"
    deadline = time.monotonic() + 30
    while not _load_pids(parent.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    (child,) = _load_pids(parent.pid)
    parent.kill()  # SIGKILL: no finally block runs; the load process must notice by itself
    parent.wait()
    deadline = time.monotonic() + 30
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child), f"load process {child} outlived the killed benchmark"


@pytest.mark.slow
def test_memory_worker_rows_and_outputs(tmp_path):
    """Two peers on the real worker processes: rows with numbers, the table and plot
    written; a peer over the memory limit gets a row saying it ran out."""
    from mamlext.bench import memory

    rows = [
        memory.run_worker(peer, 1, "cpu", limit_mb=memory.default_limit_mb(), timeout=600)
        for peer in ("higher", "mamlext (checkpoint auto)")
    ]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0 and row["peak_mb"] >= 0, row
    assert rows[-1]["path"] == "per-task"
    out = memory.run_worker("higher", 1, "cpu", limit_mb=1.0, timeout=600)
    assert out["status"] == "error" and "ran out of memory" in out["error"], out
    table = memory.markdown([*rows, out])
    assert table.count("\n") == len(rows) + 2 and "ran out of memory" in table
    memory.plot(rows, tmp_path / "memory.png", "test")
    assert (tmp_path / "memory.png").stat().st_size > 0
