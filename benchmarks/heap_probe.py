"""Live heap bytes against the RSS of one meta-step of config C, from glibc's own counters.

``mamlext bench --memory`` reports the peak RSS. On glibc that includes freed memory the
allocator keeps in its heap, so this probe reads ``mallinfo2()`` (glibc >= 2.33) in the
forward (at every tenth tensor saved for backward) and in the backward (at every tenth
saved tensor unpacked, recomputed segments included), and prints each phase's peak:
``in use`` is the live heap, ``heap`` what the heap holds, ``free`` the part of it that
nothing uses. One fresh process, config C (Conv-4/64, 20-way 1-shot, 16 tasks, second
order, the per-task path) with ``--steps K`` inner steps, after a warm-up step at ``K = 1``.

    python benchmarks/heap_probe.py --steps 50 --inner-checkpoint auto
    python benchmarks/heap_probe.py --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from mamlext.bench.configs import CONFIGS, make_batch
from mamlext.bench.peers import build_mamlext
from mamlext.bench.worker import MemoryMeter
from mamlext.cli import segment_length
from mamlext.heap import HEAP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--inner-checkpoint", type=segment_length, help="auto or a segment length")
    args = parser.parse_args()
    setting = args.inner_checkpoint
    if HEAP is None:
        raise SystemExit("heap_probe.py needs Linux with glibc >= 2.33 (mallinfo2)")
    peaks = {phase: {"in use": 0.0, "heap": 0.0, "free": 0.0} for phase in ("forward", "backward")}
    calls = {"forward": 0, "backward": 0}

    def sample(phase: str) -> None:
        calls[phase] += 1
        if calls[phase] % 10 == 0:  # mallinfo2 walks the heap's free lists: not every call
            info = HEAP.mallinfo()
            peak = peaks[phase]
            peak["in use"] = max(peak["in use"], info.uordblks / 2**20)
            if info.arena / 2**20 > peak["heap"]:
                peak.update(heap=info.arena / 2**20, free=info.fordblks / 2**20)

    def packed(tensor: torch.Tensor) -> torch.Tensor:  # the replays in backward pack too
        sample("backward" if calls["backward"] else "forward")
        return tensor

    def unpacked(tensor: torch.Tensor) -> torch.Tensor:
        sample("backward")
        return tensor

    cfg = dataclasses.replace(CONFIGS["C"], steps=args.steps)
    batch = make_batch(cfg, torch.device("cpu"), torch.float32)
    build_mamlext(dataclasses.replace(cfg, steps=1), batch).step()  # warm-up, K = 1
    built = build_mamlext(cfg, batch, inner_checkpoint=setting)
    start = HEAP.mallinfo()
    meter = MemoryMeter(torch.device("cpu"))
    meter.start()
    with torch.autograd.graph.saved_tensors_hooks(packed, unpacked):
        built.step()
    print(
        f"K={args.steps} inner_checkpoint={setting} threads={torch.get_num_threads()}: "
        f"peak RSS increase {meter.peak_mb():.1f} MB; heap before {start.arena / 2**20:.1f} "
        f"MB ({start.uordblks / 2**20:.1f} in use); sampled peaks:"
    )
    for phase, peak in peaks.items():
        print(
            f"  {phase}: in use {peak['in use']:.1f} MB, heap {peak['heap']:.1f} MB "
            f"({peak['free']:.1f} free)"
        )


if __name__ == "__main__":
    main()
