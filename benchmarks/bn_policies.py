"""Omniglot 5-way 1-shot meta-test accuracy for each BatchNorm policy, same training.

Each policy meta-trains the same Conv-4 from the same seed on the same task stream, then
is meta-tested in eval mode on the same 600 tasks of the test split. A last row shows
the pitfall of higher-style training: the transductive model evaluated with
``nn.BatchNorm`` eval semantics, i.e. with running statistics that were never trained.

    python benchmarks/bn_policies.py --data-root ../shared/data/omniglot --iterations 500
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mamlext.modules.norm import _MetaBatchNorm
from mamlext.train import TrainConfig, build_sampler, evaluate, train


def run(data_root: str, iterations: int, tasks: int, out: str) -> list[dict]:
    rows = []
    for policy in ("transductive", "per_step", "running"):
        config = TrainConfig(
            dataset="omniglot", data_root=data_root, ways=5, shots=1, bn=policy,
            iterations=iterations, eval_every=iterations, eval_tasks=tasks,
            out=f"{out}/{policy}", plot=False, progress=False,
        )  # fmt: skip
        began = time.perf_counter()
        result = train(config)
        rows.append(
            {"policy": policy, **result["final"], "train_seconds": time.perf_counter() - began}
        )
        if policy == "transductive":
            rows.append(_untrained_running_stats_row(config, out, tasks))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _untrained_running_stats_row(config: TrainConfig, out: str, tasks: int) -> dict:
    from mamlext.checkpoint import load_checkpoint
    from mamlext.train import build_maml

    config = config.resolved()
    maml = build_maml(config)
    maml.load_state_dict(load_checkpoint(f"{out}/transductive/checkpoint.pt")["maml"])
    for module in maml.modules():
        if isinstance(module, _MetaBatchNorm):
            module.set_policy(None)  # nn.BatchNorm eval: the (never updated) running stats
    sampler = build_sampler(config, "test", config.seed + 1)
    result = evaluate(maml, sampler.spawn(0), tasks, config.meta_batch, torch.device("cpu"), False)
    return {"policy": "transductive-trained, evaluated with untrained running stats", **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--out", default="runs/bn_policies")
    args = parser.parse_args()
    rows = run(args.data_root, args.iterations, args.tasks, args.out)
    print("\n| policy | meta-test accuracy (95% CI) | tasks |\n| --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['policy']} | {100 * r['mean']:.1f} +- {100 * r['ci95']:.1f} % | {r['tasks']} |"
        )


if __name__ == "__main__":
    main()
