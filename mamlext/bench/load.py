"""A documented background load for ``mamlext bench --load N``: a busy machine on purpose.

Each load process is what a PyTorch ``DataLoader`` worker is: one single-threaded torch
process (the DataLoader sets one thread per worker) that keeps one core busy, here with
``256 x 256`` float32 matrix products in a loop. ``N`` of them run for the whole benchmark,
so every peer's fresh worker process meets the same load. On a machine with ``C`` cores,
``N >= C`` means torch's default ``C`` OpenMP threads share cores with the load.

A load process exits by itself when the benchmark that started it is gone.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

LOAD_SCRIPT = """\
import os, sys, torch
torch.set_num_threads(1)
parent, a = int(sys.argv[1]), torch.randn(256, 256)
while os.getppid() == parent:
    for _ in range(100):
        a @ a
"""


def describe(processes: int) -> str:
    """The header line naming the load."""
    if processes == 0:
        return "background load: none"
    return (
        f"background load: {processes} single-threaded torch process(es) doing 256x256 "
        f"matmuls (like DataLoader workers), on {os.cpu_count()} logical CPUs"
    )


@contextlib.contextmanager
def background_load(processes: int) -> Iterator[None]:
    """Run ``processes`` load processes while the enclosed code runs."""
    if processes < 0:
        raise ValueError(f"--load must be >= 0 processes, got {processes}")
    started = [
        subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, str(os.getpid())])
        for _ in range(processes)
    ]
    try:
        yield
    finally:
        for process in started:
            process.kill()
        for process in started:
            process.wait()
