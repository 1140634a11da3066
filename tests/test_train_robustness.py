"""mamlext train/evaluate on hostile input: diverging runs, full disks, two runs on one
folder, SIGTERM, checkpoints that are not this run's."""

import errno
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import mamlext.train.loop
from mamlext.cli import main
from mamlext.train import load_checkpoint, train
from tests.conftest import REPO
from tests.test_train import quiet, read_metrics

SMALL = ["--periodic-eval-tasks", "2", "--eval-tasks", "2", "--no-plot", "--no-progress"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def assert_finite_checkpoint(path, iteration: int) -> None:
    state = load_checkpoint(path)
    assert state["iteration"] == iteration
    for name, tensor in state["maml"].items():
        assert torch.isfinite(tensor).all(), name


# ---- a diverging run ----------------------------------------------------------------------


def test_a_diverging_run_stops_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    args = ["train", "--meta-lr", "1e10", "--iterations", "30", "--eval-every", "1"]
    assert main([*args, "--out", str(tmp_path), *SMALL]) == 2
    err = one_error_line(capsys)
    found = re.search(r"diverged at iteration (\d+): the meta-loss is (nan|inf)", err)
    assert found, err
    bad = int(found.group(1))
    assert f"the last checkpoint (iteration {bad - 1}) is intact" in err
    assert_finite_checkpoint(tmp_path / "checkpoint.pt", bad - 1)
    assert [r["iteration"] for r in read_metrics(tmp_path)] == list(range(1, bad))


def test_a_resumed_run_whose_schedule_explodes_stops(tmp_path, capsys):
    run = ["--eval-every", "1", "--out", str(tmp_path), *SMALL]
    assert main(["train", "--iterations", "2", *run]) == 0
    exploding = ["--meta-lr-milestones", "3", "--meta-lr-gamma", "1e13", "--resume"]
    assert main(["train", "--iterations", "30", *exploding, *run]) == 2
    found = re.search(r"diverged at iteration (\d+)", one_error_line(capsys))
    assert found and int(found.group(1)) > 3
    assert_finite_checkpoint(tmp_path / "checkpoint.pt", int(found.group(1)) - 1)


def test_non_finite_parameters_after_a_finite_loss_stop_the_run(tmp_path, monkeypatch, capsys):
    """As when the step itself overflows: the check looks at the parameters too."""
    meta_step = mamlext.train.loop.meta_step

    def overflowing_third_step(run, iteration):
        record = meta_step(run, iteration)
        if record["iteration"] == 3:
            next(run.maml.parameters()).data.fill_(math.inf)
        return record

    monkeypatch.setattr(mamlext.train.loop, "meta_step", overflowing_third_step)
    args = ["train", "--iterations", "10", "--eval-every", "2", "--out", str(tmp_path)]
    assert main([*args, *SMALL]) == 2
    err = one_error_line(capsys)
    assert re.search(r"diverged at iteration 3: the step made \S+ non-finite", err), err
    assert "the last checkpoint (iteration 2) is intact" in err
    assert_finite_checkpoint(tmp_path / "checkpoint.pt", 2)


def test_a_run_diverging_before_its_first_checkpoint_says_so(tmp_path, capsys):
    args = ["train", "--meta-lr", "1e10", "--iterations", "30", "--eval-every", "30"]
    assert main([*args, "--out", str(tmp_path), *SMALL]) == 2
    assert "no checkpoint of this run was written" in one_error_line(capsys)
    assert not (tmp_path / "checkpoint.pt").exists()


# ---- a full disk --------------------------------------------------------------------------


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["checkpoint", "metrics"])
def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(
    tmp_path, monkeypatch, capsys, failing
):
    """The disk fills after the checkpoint of iteration 2: the write of iteration 3's record
    or of iteration 4's checkpoint fails."""
    save, open_ = torch.save, open
    appends = []

    def save_until_full(obj, f):
        if obj["iteration"] > 2:
            no_space()
        save(obj, f)

    def open_until_full(file, *args, **kwargs):
        if str(file).endswith("metrics.jsonl"):
            appends.append(file)
            if len(appends) > 2:
                no_space()
        return open_(file, *args, **kwargs)

    if failing == "checkpoint":
        monkeypatch.setattr(torch, "save", save_until_full)
    else:
        monkeypatch.setattr(mamlext.train.loop, "open", open_until_full, raising=False)
    args = ["train", "--iterations", "10", "--eval-every", "2", "--out", str(tmp_path)]
    assert main([*args, *SMALL]) == 2
    err = one_error_line(capsys)
    assert f"cannot write to {tmp_path}: No space left on device" in err
    assert "the last checkpoint (iteration 2) is intact" in err
    assert_finite_checkpoint(tmp_path / "checkpoint.pt", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.pt",
        "metrics.jsonl",
        "train.lock",
    ]  # no temporary file left


# ---- checkpoints that are not this run's --------------------------------------------------


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    train(quiet(iterations=2, eval_every=2, periodic_eval_tasks=2, eval_tasks=2, out=str(out)))
    return out


def first_weight(state):
    return next(iter(state["maml"]))


HOSTILE = {
    "no config": (lambda s: s.pop("config"), r"entries missing \['config'\], unknown \[\]"),
    "unknown entry": (lambda s: s.update(extra=1), r"entries missing \[\], unknown \['extra'\]"),
    "config not a dict": (lambda s: s.update(config=[1, 2]), "its config is a list, not a dict"),
    "unknown setting": (
        lambda s: s["config"].update(warp_speed=9),
        r"settings this mamlext does not know: \['warp_speed'\]",
    ),
    "invalid setting": (
        lambda s: s["config"].update(dataset="cifar"),
        "its config is invalid .unknown dataset 'cifar'",
    ),
    "wrong shape": (
        lambda s: s["maml"].update({first_weight(s): torch.zeros(3)}),
        r"is \(3,\), expected \(40, 1\) for this config",
    ),
    "missing weight": (lambda s: s["maml"].pop(first_weight(s)), "its model holds"),
    "diverged": (
        lambda s: s["maml"][first_weight(s)].fill_(math.nan),
        "is not finite .the run diverged",
    ),
    "optimizer of another model": (
        lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(7)),
        "its optimizer state does not fit",
    ),
    "not a count": (lambda s: s.update(iteration="2"), "iteration '2' is not a count of steps"),
    "negative time": (
        lambda s: s.update(seconds=-1.0),
        "its training time -1.0 is not a number of seconds >= 0",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_checkpoint_not_of_this_run_is_one_clear_line(good_run, tmp_path, capsys, case):
    change, message = HOSTILE[case]
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    state = load_checkpoint(out / "checkpoint.pt")
    change(state)
    torch.save(state, out / "checkpoint.pt")
    resume = ["train", "--resume", "--iterations", "4", "--eval-every", "2", "--out", str(out)]
    for args in (["evaluate", str(out / "checkpoint.pt"), "--tasks", "2"], [*resume, *SMALL]):
        assert main(args) == 2, args
        err = one_error_line(capsys)
        assert "is not a usable checkpoint of mamlext train" in err, err
        assert re.search(message, err), err


class _Code:
    """Pickled by reference: a checkpoint holding it holds code, which mamlext never loads."""


REFUSED = {
    "corrupt": lambda path: path.write_bytes(b"not a checkpoint"),
    "holding code": lambda path: torch.save({"iteration": 1, "payload": _Code()}, path),
    "of another run": lambda path: shutil.copy(path.parent.parent / "good.pt", path),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_resume_leaves_the_folder_as_it_found_it(good_run, tmp_path, capsys, case):
    shutil.copy(good_run / "checkpoint.pt", tmp_path / "good.pt")
    out = tmp_path / "run"
    out.mkdir()
    REFUSED[case](out / "checkpoint.pt")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    args = ["train", "--resume", "--iterations", "4", "--eval-every", "2", "--out", str(out)]
    other = ["--meta-lr", "0.5"] if case == "of another run" else []
    assert main([*args, *other, *SMALL]) == 2
    assert "checkpoint" in one_error_line(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # no train.lock


def test_a_resume_of_a_missing_folder_creates_nothing(tmp_path, capsys):
    out = tmp_path / "never-trained"
    args = ["train", "--resume", "--iterations", "4", "--out", str(out), *SMALL]
    assert main(args) == 2
    assert "no checkpoint at" in one_error_line(capsys)
    assert not out.exists()


# ---- two processes, SIGTERM, a crash ------------------------------------------------------


def start_training(out) -> subprocess.Popen:
    """A long ``mamlext train`` in another process, once it has written its first checkpoint."""
    args = ["train", "--iterations", "100000", "--eval-every", "3", "--out", str(out), *SMALL]
    process = subprocess.Popen(
        [sys.executable, "-m", "mamlext", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.pt").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no checkpoint from the training process: {process.communicate()}")
        time.sleep(0.2)
    return process


def resume_briefly(out) -> list[int]:
    """Resume the run in ``out`` for 2 more iterations; the iterations of its records."""
    done = load_checkpoint(out / "checkpoint.pt")["iteration"]
    train(
        quiet(
            iterations=done + 2, eval_every=3, periodic_eval_tasks=2, eval_tasks=2,
            out=str(out), resume=True,
        )
    )  # fmt: skip
    return [r["iteration"] for r in read_metrics(out)]


def test_a_second_run_on_one_folder_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    first = start_training(tmp_path)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "mamlext", "train", "--out", str(tmp_path), *SMALL],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"{tmp_path} is in use by another mamlext train (pid {first.pid} on " in (
            second.stderr
        )
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()  # a crash: no handler runs
        first.communicate()
    done = load_checkpoint(tmp_path / "checkpoint.pt")["iteration"]
    assert resume_briefly(tmp_path) == list(range(1, done + 3))


def test_sigterm_stops_like_ctrl_c_and_the_run_resumes(tmp_path):
    process = start_training(tmp_path)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == (
        "mamlext train: terminated (SIGTERM) (the last checkpoint is intact)"
    )
    done = load_checkpoint(tmp_path / "checkpoint.pt")["iteration"]
    assert resume_briefly(tmp_path) == list(range(1, done + 3))
