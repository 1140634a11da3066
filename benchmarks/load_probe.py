"""Every meta-step's time under background load, each peer in a fresh process.

``mamlext bench --load N`` reports a median of 3 steps; on a busy machine single steps
vary by 5x or more, so this probe prints each step. Config C (20-way 1-shot, 5 second-
order steps, the per-task path) with ``--tasks`` tasks; the load is the benchmark's own
(``mamlext.bench.load``); ``--env KEY=VALUE`` sets an environment variable of the peers'
processes (e.g. ``OMP_WAIT_POLICY=PASSIVE``).

    python benchmarks/load_probe.py --tasks 4 --load 2 --steps 6 [--env OMP_WAIT_POLICY=PASSIVE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

PEER_CODE = """
import dataclasses, json, sys, time, torch
from mamlext.bench.configs import CONFIGS, make_batch
from mamlext.bench.peers import PEERS
peer, tasks, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = dataclasses.replace(CONFIGS["C"], tasks=tasks)
built = PEERS[peer](cfg, make_batch(cfg, torch.device("cpu"), torch.float32))
times = []
for _ in range(steps):
    start = time.perf_counter()
    built.step()
    times.append(time.perf_counter() - start)
print(json.dumps({"peer": peer, "path": built.path, "seconds": times}))
"""


def main() -> None:
    from mamlext.bench.load import background_load, describe
    from mamlext.bench.worker import worker_env

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--load", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--peers", nargs="+", default=["higher", "mamlext"])
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE")
    a = parser.parse_args()
    extra = dict(item.split("=", 1) for item in a.env)
    print(f"config C with {a.tasks} tasks; {describe(a.load)}; peers' env {extra or 'as is'}")
    with background_load(a.load):
        time.sleep(1)
        for peer in a.peers:
            done = subprocess.run(
                [sys.executable, "-c", PEER_CODE, peer, str(a.tasks), str(a.steps)],
                capture_output=True, text=True, env=worker_env(extra), check=True,
            )  # fmt: skip
            row = json.loads(done.stdout.strip().splitlines()[-1])
            seconds = ", ".join(f"{s:.1f}" for s in row["seconds"])
            print(f"{peer:>8}: {seconds} s", flush=True)


if __name__ == "__main__":
    main()
