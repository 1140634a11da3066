"""Omniglot 5-way 1-shot meta-test accuracy for each BatchNorm policy, same training.

Each policy meta-trains the same Conv-4 from the same seed on the same task stream, then
is meta-tested in eval mode on the same 600 tasks of the test split, after 1 inner step
(as trained) and after 3 (``mamlext train``'s default at meta-test). A last row shows the
pitfall of higher-style training: the transductive model evaluated with ``nn.BatchNorm``
eval semantics, i.e. with running statistics that were never trained.

    python benchmarks/bn_policies.py --data-root ../shared/data/omniglot --iterations 300
    python benchmarks/bn_policies.py --data-root ... --evaluate-only   # reuse the checkpoints
"""

from __future__ import annotations

import argparse
import json

import torch

from mamlext.train import TrainConfig, build_maml, build_sampler, evaluate, load_checkpoint, train

POLICIES = ("transductive", "per_step", "running")
UNTRAINED = "transductive-trained, evaluated with untrained running stats"


def meta_test(run: str, policy: str, tasks: int) -> dict:
    """Accuracy after 1 and 3 inner steps, in eval mode, of the run saved in ``run``."""
    state = load_checkpoint(f"{run}/checkpoint.pt")
    config = TrainConfig(**state["config"]).resolved()
    maml = build_maml(config)
    maml.load_state_dict(state["maml"])
    if policy == UNTRAINED:
        maml.bn_policy.set(None)  # nn.BatchNorm eval: the (never updated) running stats
    sampler = build_sampler(config, "test", config.seed + 1)
    row = {"policy": policy, "iterations": state["iteration"]}
    for steps in (1, 3):
        result = evaluate(
            maml, sampler.spawn(0), tasks, config.meta_batch, torch.device("cpu"), False, steps
        )
        row[f"{steps} step"] = result
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--out", default="runs/bn_policies")
    parser.add_argument("--evaluate-only", action="store_true", help="reuse trained checkpoints")
    args = parser.parse_args()
    if not args.evaluate_only:
        for policy in POLICIES:
            train(
                TrainConfig(
                    dataset="omniglot",
                    data_root=args.data_root,
                    ways=5,
                    shots=1,
                    bn=policy,
                    iterations=args.iterations,
                    eval_every=args.iterations,
                    eval_tasks=32,
                    out=f"{args.out}/{policy}",
                    plot=False,
                    progress=False,
                )  # fmt: skip
            )
    rows = [meta_test(f"{args.out}/{policy}", policy, args.tasks) for policy in POLICIES]
    rows.append(meta_test(f"{args.out}/transductive", UNTRAINED, args.tasks))
    for row in rows:
        print(json.dumps(row))
    print("\n| policy | iterations | after 1 step | after 3 steps |\n| --- | --- | --- | --- |")
    for r in rows:
        cells = [
            f"{100 * r[k]['mean']:.1f} +- {100 * r[k]['ci95']:.1f} %" for k in ("1 step", "3 step")
        ]
        print(f"| {r['policy']} | {r['iterations']} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
