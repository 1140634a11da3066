"""Omniglot 5-way 1-shot: each BatchNorm policy meta-trained, then meta-tested three ways.

Every policy meta-trains the same Conv-4 from the same seed on the same task stream (the MAML
paper's settings, `mamlext train`'s defaults for Omniglot 5-way 1-shot), then is meta-tested
in eval mode on the same 600 test tasks with 5 queries per class, predicting each query:

- ``task``: with all 25 queries of its task at once (what MAML's evaluation does);
- ``one``: alone, one query at a time;
- ``mixed``: with the task's other queries replaced by queries of other tasks.

A transductive policy gains from seeing the other queries; the gap between the columns
is how much (docs/train_eval.md). Extra rows: the transductive model meta-tested with
``bn="support"``, and with never-trained running statistics (the higher pitfall).
Each run is the command it prints (``mamlext train ...`` then ``mamlext evaluate ...``);
checkpoints are reused, so a second call only meta-tests.

    python benchmarks/bn_policies.py --data-root ../shared/data/omniglot --iterations 3000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from mamlext.train import (
    QUERY_MODES,
    TrainConfig,
    build_maml,
    build_sampler,
    evaluate,
    evaluate_checkpoint,
    load_checkpoint,
    load_run_checkpoint,
    train,
)

POLICIES = ("transductive", "support", "per_step", "running")
PITFALL = "transductive, meta-tested with never-trained running statistics (higher's pitfall)"


def train_policy(policy: str, args: argparse.Namespace) -> Path:
    """Meta-train (or resume, or reuse) the run of ``policy``; its checkpoint's path."""
    out = Path(args.out) / policy
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and load_checkpoint(checkpoint)["iteration"] >= args.iterations:
        return checkpoint
    print(
        f"mamlext train --dataset omniglot --data-root {args.data_root} --split-scheme maml "
        f"--ways 5 --shots 1 --bn {policy} --iterations {args.iterations} "
        f"--eval-every {args.eval_every} --out {out}",
        flush=True,
    )
    train(
        TrainConfig(
            dataset="omniglot",
            data_root=args.data_root,
            split_scheme="maml",
            ways=5,
            shots=1,
            bn=policy,
            iterations=args.iterations,
            eval_every=args.eval_every,
            eval_tasks=100,
            out=str(out),
            resume=checkpoint.exists(),
            plot=False,
            progress=False,
        )  # fmt: skip
    )
    return checkpoint


def pitfall(checkpoint: Path, tasks: int, query: int) -> dict:
    """The transductive run in ``nn.BatchNorm``'s eval: running statistics never trained."""
    state, config = load_run_checkpoint(checkpoint)
    maml = build_maml(config)
    maml.load_state_dict(state["maml"])
    maml.bn_policy.set(None)
    sampler = build_sampler(dataclasses.replace(config, query=query), "test", config.seed + 1)
    return evaluate(maml, sampler.spawn(0), tasks, config.meta_batch, torch.device("cpu"), False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--query", type=int, default=5, help="query examples per class")
    parser.add_argument("--out", default="runs/bn_policies")
    args = parser.parse_args()
    rows = []
    for policy in POLICIES:
        checkpoint = train_policy(policy, args)
        evaluations = [(policy, policy)]
        if policy == "transductive":
            evaluations.append(("transductive, meta-tested with support", "support"))
        for label, bn in evaluations:
            row = {"policy": label, "seconds": load_checkpoint(checkpoint)["seconds"]}
            for mode in QUERY_MODES:
                print(f"mamlext evaluate {checkpoint} --bn {bn} --query-mode {mode} "
                      f"--query {args.query} --tasks {args.tasks}", flush=True)  # fmt: skip
                row[mode] = evaluate_checkpoint(
                    str(checkpoint), args.tasks, bn=bn, query_mode=mode, query=args.query
                )
            rows.append(row)
    transductive = Path(args.out) / "transductive" / "checkpoint.pt"
    rows.append({"policy": PITFALL, "task": pitfall(transductive, args.tasks, args.query)})
    with open(Path(args.out) / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("\n| policy | training | all queries of the task | one at a time | others' queries |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        cells = [
            f"{100 * row[m]['mean']:.1f} +- {100 * row[m]['ci95']:.1f} %" if m in row else "-"
            for m in QUERY_MODES
        ]
        seconds = f"{row['seconds']:.0f} s" if "seconds" in row else ""
        print(f"| {row['policy']} | {seconds} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
