"""MAML++ as its authors compute it, against its own query-row option and mamlext's earlier
MAML++, on the same CPU budget.

Three ``mamlext train --algorithm mamlpp`` runs on Omniglot 5-way 1-shot start together, one
thread each, and are stopped (SIGTERM: the last checkpoint stays) after the same wall time:

- ``authors``: the preset, as the authors' code computes it (docs/mamlpp.md): their network,
  the query after step k on BatchNorm row k, schedules once per epoch of 500 iterations;
- ``own_row``: the same with ``--bn-query-row own`` alone: a row of the query's own
  (K + 1 rows of BatchNorm weights and biases), mamlext's choice before;
- ``earlier``: mamlext's earlier preset: the MAML paper's strided Conv-4, the query's own
  row, schedules moving every iteration over 60,000 iterations.

Data, seed and every other setting are the same; each keeps its full-length schedule, so the
comparison is of the first part of full runs. Then each checkpoint is meta-tested on 600 test
tasks.

    python benchmarks/mamlpp_semantics.py --data-root ../shared/data/omniglot --minutes 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from mamlext.train import evaluate_checkpoint, load_checkpoint
from mamlext.train.plots import learning_curves

RUNS = {
    "authors": [],
    "own_row": ["--bn-query-row", "own"],
    "earlier": [
        "--model", "mamlext.models:conv4", "--bn-query-row", "own", "--schedule-epoch", "1",
        "--iterations", "60000",
    ],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--out", default="runs/mamlpp_semantics")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {}
    for name, extra in RUNS.items():
        command = [
            sys.executable, "-m", "mamlext", "train", "--dataset", "omniglot",
            "--data-root", args.data_root, "--split-scheme", "maml", "--ways", "5",
            "--shots", "1", "--algorithm", "mamlpp", "--eval-every", str(args.eval_every),
            "--no-progress", "--no-plot", "--out", str(out / name), *extra,
        ]  # fmt: skip
        print(" ".join(command[1:]), flush=True)
        log = open(out / f"{name}.log", "w")  # noqa: SIM115 (kept open)
        procs[name] = subprocess.Popen(
            ["timeout", "-s", "TERM", f"{args.minutes * 60:.0f}", *command],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    for name, proc in procs.items():
        print(f"{name}: exit status {proc.wait()} (124: stopped at the time limit)", flush=True)
    rows = []
    for name in RUNS:
        checkpoint = out / name / "checkpoint.pt"
        state = load_checkpoint(checkpoint)
        final = evaluate_checkpoint(str(checkpoint), args.tasks)
        learning_curves(out / name / "metrics.jsonl", out / f"{name}_learning_curves.png")
        lines = (out / name / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line]
        curve = {r["iteration"]: r["eval"]["mean"] for r in records if "eval" in r}
        rows.append({"run": name, "seconds": state["seconds"], "curve": curve, "final": final})
        print(json.dumps(rows[-1]), flush=True)
    with open(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("\n| run | iterations | seconds | 600 test tasks | 100-task evaluations |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        curve = ", ".join(f"{i}: {100 * a:.1f}" for i, a in r["curve"].items())
        final = f"{100 * r['final']['mean']:.1f} +- {100 * r['final']['ci95']:.1f} %"
        print(
            f"| {r['run']} | {r['final']['iteration']} | {r['seconds']:.0f} | {final} | {curve} |"
        )


if __name__ == "__main__":
    main()
