"""mamlext train/evaluate: learning, resume, atomic checkpoints, and one-line errors."""

import copy
import itertools
import json
import math
import shutil
import subprocess
import sys
import types

import pytest
import torch

import mamlext.train.loop
from mamlext.train import (
    CheckpointError,
    TrainConfig,
    build_maml,
    build_sampler,
    evaluate,
    load_checkpoint,
    meta_lr_at,
    save_checkpoint,
    to_device,
    train,
)
from tests.conftest import REPO, SHARED_DATA

OMNIGLOT = SHARED_DATA / "omniglot"
needs_omniglot = pytest.mark.skipif(not OMNIGLOT.exists(), reason=f"no Omniglot at {OMNIGLOT}")


def quiet(**kwargs) -> TrainConfig:
    return TrainConfig(progress=False, plot=False, **kwargs)


def test_sinusoid_adaptation_helps(tmp_path):
    result = train(quiet(iterations=400, eval_every=400, eval_tasks=200, out=str(tmp_path)))
    before, after = result["before_adaptation"], result["final"]
    assert after["mean"] + after["ci95"] < before["mean"] - before["ci95"], (before, after)


@needs_omniglot
def test_omniglot_smoke_training_clearly_beats_chance(tmp_path):
    config = quiet(
        dataset="omniglot", data_root=str(OMNIGLOT), ways=5, shots=1, meta_batch=8,
        iterations=60, eval_every=60, eval_tasks=200, out=str(tmp_path),
    )  # fmt: skip
    final = train(config)["final"]
    chance = 1 / 5
    assert final["mean"] - final["ci95"] > chance + 0.15, final
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 60 and "eval" in json.loads(lines[-1])


@needs_omniglot
@pytest.mark.parametrize("scheme,train_characters", [("vinyals", 1028), ("maml", 1200)])
def test_split_scheme_chooses_the_training_characters(scheme, train_characters):
    config = TrainConfig(dataset="omniglot", data_root=str(OMNIGLOT), split_scheme=scheme)
    config = config.resolved()
    assert build_sampler(config, "train", 0).num_classes == 4 * train_characters  # rotations
    assert build_sampler(config, "test", 1).num_classes == 423


@needs_omniglot
def test_queries_default_to_as_many_as_the_shots():
    """As the MAML paper's code samples them (cbfinn/maml main.py: 2K examples per class);
    MAML++'s (HowToTrainYourMAMLPytorch experiment_config/: "num_target_samples": 1)."""
    for dataset, ways in (("omniglot", 5), ("sinusoid", 1)):
        root = str(OMNIGLOT) if dataset == "omniglot" else None
        for shots, query, expected in ((5, None, 5), (3, None, 3), (5, 2, 2)):
            config = TrainConfig(
                dataset=dataset, data_root=root, ways=ways, shots=shots, query=query
            ).resolved()
            batch = build_sampler(config, "train", 0).sample(2)
            xs, _, xq, _ = to_device(batch, torch.device("cpu"))
            assert xs.shape[:2] == (2, shots * ways), (dataset, shots, query)
            assert xq.shape[:2] == (2, expected * ways), (dataset, shots, query)
    # MAML++'s Omniglot configs: one query example per class whatever the shots
    config = TrainConfig(dataset="omniglot", data_root=str(OMNIGLOT), shots=5, algorithm="mamlpp")
    batch = build_sampler(config.resolved(), "train", 0).sample(2)
    _, _, xq, _ = to_device(batch, torch.device("cpu"))
    assert xq.shape[:2] == (2, 5)


@pytest.mark.parametrize("algorithm", ["fomaml", "metasgd", "mamlpp", "anil"])
def test_every_algorithm_trains(tmp_path, monkeypatch, algorithm):
    """30 steps at a high outer rate learn: every meta-parameter moved and is finite, and the
    adapted query MSE beats no adaptation and the untrained initialisation's adaptation."""
    built = []  # (the MAML train() trains, a copy of its initialisation)

    def build_and_keep(config):
        maml = build_maml(config)
        built.append((maml, copy.deepcopy(maml)))
        return maml

    monkeypatch.setattr(mamlext.train.loop, "build_maml", build_and_keep)
    # test_steps=1, as trained: learned step sizes fitted to one step may diverge over more
    config = quiet(
        algorithm=algorithm, iterations=30, meta_lr=1e-2, test_steps=1, eval_every=30,
        periodic_eval_tasks=10, eval_tasks=100, out=str(tmp_path),
    )  # fmt: skip
    result = train(config)
    [(trained, untrained)] = built
    for (name, p), p0 in zip(trained.named_parameters(), untrained.parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        assert not torch.equal(p, p0), f"{name} did not change"
    before, after = result["before_adaptation"]["mean"], result["final"]["mean"]
    assert math.isfinite(before) and math.isfinite(after), result
    assert after < before, result
    # The same 100 test tasks (the test split's stream 0), adapted from the initialisation:
    test_tasks = build_sampler(config.resolved(), "test", config.seed + 1).spawn(0)
    from_init = evaluate(untrained, test_tasks, 100, 25, torch.device("cpu"), regression=True)
    assert after < 0.95 * from_init["mean"], (result, from_init)


def test_a_plain_nn_module_trains_and_resumes(tmp_path):
    """--model names any nn.Module factory (its own forward, no Meta layers)."""
    options = dict(model="tests.models:plain_regressor", eval_every=400, eval_tasks=100)
    result = train(quiet(iterations=400, out=str(tmp_path), **options))
    before, after = result["before_adaptation"], result["final"]
    assert after["mean"] + after["ci95"] < before["mean"] - before["ci95"], (before, after)
    resumed = train(quiet(iterations=410, out=str(tmp_path), resume=True, **options))
    assert math.isfinite(resumed["final"]["mean"])
    # The same network as the default Meta MLP (built in the same order, so the same initial
    # weights): the same run, number for number
    short = dict(iterations=20, eval_every=20, eval_tasks=20)
    plain = train(quiet(out=str(tmp_path / "plain"), model=options["model"], **short))
    meta = train(quiet(out=str(tmp_path / "meta"), **short))
    assert (
        plain["final"] == meta["final"] and plain["before_adaptation"] == meta["before_adaptation"]
    )
    with pytest.raises(ValueError, match="--model 'tests.models:nothing': cannot import it"):
        train(quiet(iterations=1, out=str(tmp_path / "x"), model="tests.models:nothing"))


@needs_omniglot
def test_a_plain_classifier_with_batchnorm_trains_on_omniglot(tmp_path):
    config = quiet(
        dataset="omniglot", data_root=str(OMNIGLOT), ways=5, shots=1, meta_batch=8,
        iterations=40, eval_every=40, eval_tasks=100, out=str(tmp_path),
        model="tests.models:plain_conv",
    )  # fmt: skip
    final = train(config)["final"]
    assert final["mean"] - final["ci95"] > 0.2 + 0.1, final


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(quiet(iterations=20, eval_every=10, eval_tasks=10, out=str(whole)))
    train(quiet(iterations=10, eval_every=10, eval_tasks=10, out=str(part)))
    train(quiet(iterations=20, eval_every=10, eval_tasks=10, out=str(part), resume=True))
    read = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read(whole), read(part)
    assert [r["iteration"] for r in b] == list(range(1, 21))
    for ra, rb in zip(a, b):
        ra.pop("seconds", None), rb.pop("seconds", None)
        assert ra == rb


def test_seconds_count_the_meta_steps_of_every_session(tmp_path, monkeypatch):
    """A record's ``seconds`` is the time in meta-steps so far: a resumed run carries its
    checkpoint's on, and evaluations do not count (a clock that ticks one second per read,
    and an evaluation that reads it too)."""
    clock = itertools.count()
    fake_time = types.SimpleNamespace(perf_counter=lambda: float(next(clock)))
    monkeypatch.setattr(mamlext.train.loop, "time", fake_time)
    real_evaluate = mamlext.train.loop.evaluate

    def evaluate_reading_the_clock(*args, **kwargs):
        for _ in range(5):
            mamlext.train.loop.time.perf_counter()
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(mamlext.train.loop, "evaluate", evaluate_reading_the_clock)
    options = dict(eval_every=5, eval_tasks=10, out=str(tmp_path))
    train(quiet(iterations=10, **options))
    train(quiet(iterations=15, **options, resume=True))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    seconds = {r["iteration"]: r["seconds"] for r in records if "seconds" in r}
    assert seconds == {5: 5.0, 10: 10.0, 15: 15.0}


def test_inner_checkpointing_trains_as_the_stored_graph_and_resumes_with_it(tmp_path):
    """``--inner-checkpoint`` changes memory, not results: the same metrics (to float32
    roundoff) as the run that stores the graph; a run may be resumed with it switched on."""
    stored, checkpointed, part = tmp_path / "stored", tmp_path / "ckpt", tmp_path / "part"
    options = dict(iterations=12, eval_every=6, eval_tasks=10, inner_steps=3)
    train(quiet(**options, out=str(stored)))
    train(quiet(**options, out=str(checkpointed), inner_checkpoint="auto"))
    train(quiet(**{**options, "iterations": 6}, out=str(part)))
    train(quiet(**options, out=str(part), inner_checkpoint=2, resume=True))
    reference = read_metrics(stored)
    for run in (checkpointed, part):
        records = read_metrics(run)
        assert [r["iteration"] for r in records] == [r["iteration"] for r in reference]
        for a, b in zip(reference, records):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)


def test_resume_after_a_crash_drops_the_records_past_the_checkpoint(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(quiet(iterations=20, eval_every=10, eval_tasks=10, out=str(whole)))
    train(quiet(iterations=10, eval_every=10, eval_tasks=10, out=str(part)))
    # a crash at iteration 13: three records past the checkpoint and a line cut short
    past = (whole / "metrics.jsonl").read_text().splitlines()[10:13]
    with open(part / "metrics.jsonl", "a") as f:
        f.write("".join(line + "\n" for line in past) + '{"iteration": 14, "lo')
    train(quiet(iterations=20, eval_every=10, eval_tasks=10, out=str(part), resume=True))
    assert read_metrics(part) == read_metrics(whole)


def read_metrics(out) -> list[dict]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("seconds", None)
    return records


def test_meta_lr_schedule_equals_torch_multistep_lr():
    config = TrainConfig(meta_lr=0.3, meta_lr_milestones=(7, 3, 12), meta_lr_gamma=0.5).resolved()
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    reference = torch.optim.lr_scheduler.MultiStepLR(optimizer, [3, 7, 12], gamma=0.5)
    for iteration in range(20):
        assert meta_lr_at(config, iteration) == pytest.approx(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()


def test_resume_may_add_a_milestone_after_the_checkpoint(tmp_path):
    """The resumed run equals an uninterrupted run with the milestone from the start."""
    whole, part, constant = tmp_path / "whole", tmp_path / "part", tmp_path / "constant"
    run = dict(iterations=20, eval_every=10, eval_tasks=10)
    train(quiet(**run, meta_lr_milestones=(15,), meta_lr_gamma=0.01, out=str(whole)))
    train(quiet(**run, out=str(constant)))
    train(quiet(iterations=10, eval_every=10, eval_tasks=10, out=str(part)))
    train(quiet(**run, meta_lr_milestones=(15,), meta_lr_gamma=0.01, out=str(part), resume=True))
    assert read_metrics(part) == read_metrics(whole)
    assert read_metrics(part)[15:] != read_metrics(constant)[15:]  # the drop took effect
    assert read_metrics(part)[-1]["meta_lr"] == pytest.approx(1e-5)


@needs_omniglot
def test_a_run_moved_to_another_folder_and_data_root_resumes(tmp_path):
    """As when a run goes to a GPU machine with its own copy of the data, and back."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "omniglot_28x28.npz").symlink_to(OMNIGLOT / "omniglot_28x28.npz")
    run = dict(dataset="omniglot", split_scheme="maml", meta_batch=2, eval_every=2, eval_tasks=4)
    whole, part, moved = tmp_path / "whole", tmp_path / "part", tmp_path / "moved"
    train(quiet(**run, data_root=str(OMNIGLOT), iterations=4, out=str(whole)))
    train(quiet(**run, data_root=str(OMNIGLOT), iterations=2, out=str(part)))
    shutil.copytree(part, moved)
    train(quiet(**run, data_root=str(data), iterations=4, out=str(moved), resume=True))
    assert read_metrics(moved) == read_metrics(whole)


def test_resume_refuses_a_schedule_change_before_the_checkpoint(tmp_path):
    train(quiet(iterations=10, eval_every=10, eval_tasks=10, out=str(tmp_path)))
    changed = quiet(
        iterations=20, eval_every=10, eval_tasks=10, out=str(tmp_path), resume=True,
        meta_lr_milestones=(5,),
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="meta_lr schedule before iteration 10"):
        train(changed)


def test_resume_may_change_the_periodic_evaluation_but_not_the_seed(tmp_path):
    run = dict(eval_every=10, eval_tasks=10, out=str(tmp_path))
    train(quiet(iterations=10, periodic_eval_tasks=7, **run))
    train(quiet(iterations=20, periodic_eval_tasks=5, resume=True, **run))
    assert [r["eval"]["tasks"] for r in read_metrics(tmp_path) if "eval" in r] == [7, 5]
    with pytest.raises(CheckpointError, match="seed: checkpoint 0 vs now 1"):
        train(quiet(iterations=30, seed=1, resume=True, **run))


def test_an_interrupted_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"iteration": 1, "x": torch.ones(3)}, path)

    def failing_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"iteration": 2, "x": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["iteration"] == 1 and list(tmp_path.iterdir()) == [path]


def cli(*args: str):
    return subprocess.run(
        [sys.executable, "-m", "mamlext", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["train", "--algorithm", "reptile"], "unknown algorithm 'reptile'"),
        (["train", "--dataset", "omniglot"], "needs --data-root"),
        (["train", "--dataset", "omniglot", "--data-root", "/nonexistent"], "download"),
        pytest.param(
            ["train", "--dataset", "omniglot", "--data-root", str(OMNIGLOT), "--ways", "5000"],
            "5000",
            marks=needs_omniglot,
        ),
        pytest.param(
            [
                "train",
                "--dataset",
                "omniglot",
                "--data-root",
                str(OMNIGLOT),
                "--shots",
                "15",
                "--query",
                "10",
            ],
            "15",
            marks=needs_omniglot,
        ),
        (["train", "--out", "/proc/forbidden/run"], "cannot write to the output folder"),
        pytest.param(
            ["train", "--dataset", "omniglot", "--data-root", str(OMNIGLOT), "--split-scheme", "x"],
            "split_scheme in",
            marks=needs_omniglot,
        ),
        (["train", "--iterations", "0"], "--iterations must be >= 1"),
        (["train", "--meta-lr-milestones", "0"], "--meta-lr-milestones must be >= 1"),
        (["train", "--periodic-eval-tasks", "0"], "--periodic-eval-tasks must be >= 1"),
        (["train", "--inner-checkpoint", "0"], "--inner-checkpoint must be auto or a segment"),
    ],
)
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(args, message):
    result = cli(*args, "--no-progress")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_corrupt_checkpoint_on_resume_and_evaluate(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    for args in (
        ["train", "--resume", "--out", str(tmp_path)],
        ["evaluate", str(tmp_path / "checkpoint.pt")],
    ):
        result = cli(*args)
        assert result.returncode == 2 and "corrupt or unreadable" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"not a checkpoint"  # nothing overwritten


def test_cli_train_then_evaluate(tmp_path):
    result = cli(
        "train",
        "--iterations",
        "30",
        "--eval-every",
        "30",
        "--eval-tasks",
        "20",
        "--out",
        str(tmp_path),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "meta-test MSE over 20 tasks" in result.stdout
    records = read_metrics(tmp_path)
    assert [r["eval"]["tasks"] for r in records if "eval" in r] == [100]  # the default
    for name in ("checkpoint.pt", "metrics.jsonl", "final.json", "learning_curves.png", "fits.png"):
        assert (tmp_path / name).exists(), name
    evaluated = cli("evaluate", str(tmp_path / "checkpoint.pt"), "--tasks", "20")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["tasks"] == 20


class RunsCode:
    def __reduce__(self):
        return (print, ("a pickle that runs code when loaded",))


def test_a_checkpoint_holding_code_is_refused_saying_why(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"iteration": 1, "payload": RunsCode()}, path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert "holds code or Python objects (print) that mamlext will not load" in message
    assert "could run arbitrary code" in message and "Weights only" not in message
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"corrupt or unreadable \(UnpicklingError: Unsup"):
        load_checkpoint(path)
