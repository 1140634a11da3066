"""The peer benchmark on its tiny config: every worker returns numbers, and the peers that
compute the exact MAML meta-gradient agree with higher. No assertion about time."""

import math

import pytest

from mamlext import bench

PEERS = ("higher", "mamlext", "foreach loop", "torchmeta")
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
    for peer in PEERS:
        row = rows[peer]
        assert row["status"] == "ok" and "error" not in row, row
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, row
        assert math.isfinite(row["peak_mb"]) and row["peak_mb"] >= 0, row
        assert row["speedup"] is not None, row
    assert rows["mamlext"]["path"] in ("batched", "per-task")


def test_meta_gradients_agree_with_higher(rows):
    assert rows["higher"]["err_f32"] == 0  # a second run of higher, bit for bit
    for peer in ("mamlext", "foreach loop", "torchmeta"):
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
    assert bench.run_worker("tiny", "learn2learn", "cpu", 0, 1, env=ENV)["status"] in (
        "ok",
        "unavailable",
    )


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
