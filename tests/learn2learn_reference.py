"""The learn2learn API on fixed weights and batches: run under the real learn2learn 0.2.0
(Python 3.10) it writes the reference that tests/test_compat_learn2learn.py holds mamlext's
shim to; under the shim, the values to compare.

    python tests/learn2learn_reference.py OUT.pt [--shim]
"""

import random
import sys

import torch
import torch.nn.functional as F
from torch import nn

if "--shim" in sys.argv:
    import mamlext.compat.learn2learn  # noqa: F401

import learn2learn as l2l
from learn2learn.data.transforms import (
    ConsecutiveLabels,
    FusedNWaysKShots,
    KShots,
    LoadData,
    NWays,
    RemapLabels,
)

F64 = torch.float64


def model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    ).to(dtype)  # fmt: skip


def batches(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 1, 6, 6, generator=g, dtype=F64).to(dtype)
    y = torch.arange(3).repeat(4, 2)
    return x, y


def run_algorithm(name, make, steps, dtype=F64, **adapt):
    net = model(dtype)
    learner = make(net)
    x, y = batches(dtype)
    total = 0
    adapted = []
    for t in range(4):
        clone = learner.clone()
        for _ in range(steps):
            clone.adapt(F.cross_entropy(clone(x[t]), y[t]), **adapt)
        adapted.append([p.detach().clone() for p in clone.parameters()])
        total = total + F.cross_entropy(clone(x[t]), y[t])
    (total / 4).backward()
    return {
        f"{name}/loss": total.detach() / 4,
        f"{name}/adapted": adapted,
        f"{name}/grads": [p.grad.clone() for p in learner.parameters()],
        f"{name}/running_mean": net[1].running_mean.clone(),  # shared with the clones
    }


def run_tasks():
    """Tasks of a small labelled dataset, Python's random seeded: the RNG stream's use."""
    random.seed(3)
    xs = torch.arange(60, dtype=F64).reshape(60, 1)
    ys = torch.arange(60) % 6
    dataset = l2l.data.MetaDataset(torch.utils.data.TensorDataset(xs, ys))
    fused = l2l.data.Taskset(dataset, [FusedNWaysKShots(dataset, n=3, k=2), LoadData(dataset),
                                       RemapLabels(dataset), ConsecutiveLabels(dataset)])  # fmt: skip
    steps = l2l.data.Taskset(dataset, [NWays(dataset, n=2), KShots(dataset, k=3),
                                       LoadData(dataset), RemapLabels(dataset)], num_tasks=5)  # fmt: skip
    out = {}
    for i in range(4):
        x, y = fused.sample()
        out[f"tasks/fused/{i}"] = (x.clone(), y.clone())
        x, y = steps.sample()
        out[f"tasks/steps/{i}"] = (x.clone(), y.clone())
    return out


def main():
    results = {}
    for first_order in (False, True):
        results.update(run_algorithm(
            f"maml/first_order={first_order}",
            lambda m, fo=first_order: l2l.algorithms.MAML(m, lr=0.3, first_order=fo), steps=2,
        ))  # fmt: skip
    results.update(run_algorithm(
        "metasgd", lambda m: l2l.algorithms.MetaSGD(m, lr=0.3), steps=2
    ))  # fmt: skip
    results.update(run_algorithm(  # float32: the fused update rounds as learn2learn's p + (-lr g)
        "maml/float32", lambda m: l2l.algorithms.MAML(m, lr=0.3), steps=3, dtype=torch.float32
    ))  # fmt: skip
    results.update(run_tasks())
    torch.save(results, sys.argv[1])


if __name__ == "__main__":
    main()
