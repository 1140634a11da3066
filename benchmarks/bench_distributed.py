"""Meta-training throughput (tasks per second) with 1 and 2 processes on torch.distributed.

Runs ``torchrun --nproc_per_node=N -m mamlext train`` on Omniglot 5-way 1-shot (meta-batch
32, the MAML paper's setting) for a fixed number of iterations and reads the wall-clock
of the training loop from the metrics. One thread per process.

    python benchmarks/bench_distributed.py --data-root ../shared/data/omniglot
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(processes: int, data_root: str, iterations: int, meta_batch: int, out: Path) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
        "--master_port", str(29400 + processes), "-m", "mamlext", "train", "--dataset", "omniglot",
        "--data-root", data_root, "--meta-batch", str(meta_batch), "--iterations", str(iterations),
        "--eval-every", str(iterations), "--eval-tasks", "32", "--out", str(out),
        "--no-progress", "--no-plot",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    subprocess.run(command, check=True, env=env, capture_output=True)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # "seconds": the training loop's time up to the last iteration, before its evaluation
    return {
        "processes": processes,
        "seconds": last["seconds"],
        "tasks_per_second": iterations * meta_batch / last["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--meta-batch", type=int, default=32)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            rows.append(
                run(
                    processes,
                    args.data_root,
                    args.iterations,
                    args.meta_batch,
                    Path(tmp) / str(processes),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    print("\n| processes | tasks / s | speed-up |\n| --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['processes']} | {r['tasks_per_second']:.1f} | {r['tasks_per_second'] / rows[0]['tasks_per_second']:.2f}x |"
        )


if __name__ == "__main__":
    main()
