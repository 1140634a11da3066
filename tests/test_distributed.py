"""Multi-process meta-training on torch.distributed (gloo, 2 real processes)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import REPO

STEPS_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    import mamlext
    from mamlext.distributed import World
    from mamlext.models import conv4
    torch.set_num_threads(1)
    world = World.from_environment("cpu")
    torch.manual_seed(0)
    model = conv4(ways=3, hidden=4, image_size=12).double()
    segment = os.environ.get("INNER_CHECKPOINT")
    maml = mamlext.MAML(model, step_size=0.3, num_steps=2, bn=sys.argv[1],
                        step_size_mode=sys.argv[2],
                        inner_checkpoint=int(segment) if segment else None).double()
    world.broadcast_parameters(maml)
    # SGD: Adam would turn the rounding noise of the (mathematically zero) gradient of a
    # conv bias before BatchNorm into full-size steps
    opt = torch.optim.SGD(maml.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    tasks = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    for step in range(4):
        # the same combined meta-batch everywhere; each rank takes its share
        xs = torch.randn(tasks, 6, 1, 12, 12, generator=gen, dtype=torch.float64)
        xq = torch.randn(tasks, 6, 1, 12, 12, generator=gen, dtype=torch.float64)
        ys = torch.randint(0, 3, (tasks, 6), generator=gen)
        yq = torch.randint(0, 3, (tasks, 6), generator=gen)
        share = world.share(tasks)
        if os.environ.get("DIE_AT") == str(step) and world.rank == 1:
            os._exit(3)
        loss, _ = maml(xs[share], ys[share], xq[share], yq[share])
        opt.zero_grad()
        loss.backward()
        world.average_gradients(
            maml, tasks=share.stop - share.start, buffers=maml.bn_policy.statistics()
        )
        opt.step()
    if world.is_main:
        torch.save({k: v.detach().clone() for k, v in maml.state_dict().items()}, sys.argv[3])
    world.close()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size, args, extra_env=None, timeout=300, script=STEPS_SCRIPT):
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        if world_size > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        env.update(extra_env or {})
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script, *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    return [(p.wait(timeout=timeout), *p.communicate()) for p in procs]


@pytest.mark.parametrize(
    "bn,mode,tasks",
    [
        ("transductive", "fixed", 4),
        ("per_step", "per_layer_per_step", 4),
        ("running", "per_element", 4),
        # uneven shares (1 and 2 tasks), averaged with weights
        ("transductive", "fixed", 3),
        ("per_step", "per_layer_per_step", 3),
        ("support", "per_element", 3),
    ],
)
def test_two_processes_equal_one_process_on_the_combined_meta_batch(tmp_path, bn, mode, tasks):
    assert_two_equal_one(tmp_path, bn, mode, tasks)


def test_two_checkpointed_processes_equal_one_storing_process(tmp_path):
    """Inner-loop checkpointing (recomputed in each rank's backward) with per-step
    statistics and rates: the job equals one process that stores the inner loop's graph."""
    assert_two_equal_one(tmp_path, "per_step", "per_layer_per_step", 3, {"INNER_CHECKPOINT": "1"})


def assert_two_equal_one(tmp_path, bn, mode, tasks, two_env=None):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for world_size, out, env in ((1, one, None), (2, two, two_env)):
        for code, _, err in launch(world_size, [bn, mode, str(out), str(tasks)], env):
            assert code == 0, err
    a, b = torch.load(one), torch.load(two)
    assert a.keys() == b.keys()
    moved = [k for k in a if "step_sizes" in k or "running" in k]
    assert moved or bn in ("transductive", "support")
    for k in a:
        torch.testing.assert_close(
            b[k], a[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_a_dying_rank_makes_the_other_exit_with_a_clear_error(tmp_path):
    results = launch(
        2, ["transductive", "fixed", str(tmp_path / "x.pt")],
        extra_env={"DIE_AT": "1", "MAMLEXT_DIST_TIMEOUT": "20"}, timeout=120,
    )  # fmt: skip
    (code0, _, err0), (code1, _, _) = results
    assert code1 == 3
    assert code0 != 0
    assert "another process of the job stopped" in err0, err0[-2000:]


CLOSE_SCRIPT = textwrap.dedent(
    """
    import json, os, torch
    from mamlext.distributed import World

    def gloo_threads():
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        return sorted(n for n in names if "gloo" in n)

    world = World.from_environment("cpu")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())  # imports torch._dynamo, as train() does
    model(torch.randn(4, 3)).sum().backward()
    world.average_gradients(model)
    optimizer.step()
    world.mean(torch.tensor(1.0))
    world.gather_states(torch.optim.SGD(model.parameters(), lr=0.1))  # has a state_dict
    before = gloo_threads()
    world.close()
    print(json.dumps([before, gloo_threads()]))
    """
)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads in Linux's /proc")
def test_close_stops_the_gloo_worker_threads():
    # A gloo worker left running when Python shuts down can abort the process (see
    # World.from_environment); torchrun then fails a job that finished.
    for code, out, err in launch(2, [], script=CLOSE_SCRIPT, timeout=120):
        assert code == 0, err
        before, after = json.loads(out)
        assert before, out  # the names match gloo's threads, so `after` is meaningful
        assert after == [], out


def test_torchrun_training_job_and_resume(tmp_path):
    # --meta-batch 7 over 2 processes: uneven shares of 3 and 4 tasks
    out = tmp_path / "run"
    base = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
        "-m", "mamlext", "train", "--meta-batch", "7", "--eval-every", "5", "--eval-tasks", "20",
        "--out", str(out), "--no-progress", "--no-plot",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(
        [*base, "--iterations", "5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("meta-test MSE") == 1  # only rank 0 reports
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(state["samplers"]) == 2 and state["samplers"][0] != state["samplers"][1]
    second = subprocess.run(
        [*base, "--iterations", "10", "--resume"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(1, 11))
