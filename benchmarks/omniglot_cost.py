"""What the MAML paper's Omniglot runs cost on this machine: FLOPs and seconds per iteration.

For each setting of Finn et al. (2017), Table 1, one meta-training iteration of
``mamlext train`` (``MAML.meta_backward`` on a meta-batch of real Omniglot tasks, then
Adam) is counted with ``torch.utils.flop_counter.FlopCounterMode`` (every forward,
backward and double-backward convolution and matmul) and timed (median of a few). The
projection is simply seconds per iteration times the paper's 60,000 iterations. Timed on
the path ``mamlext train`` takes (task-batched for small tasks on a CPU).

    python benchmarks/omniglot_cost.py --data-root ../shared/data/omniglot
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch.utils.flop_counter import FlopCounterMode

from mamlext.bench.op import median_ms
from mamlext.train import TrainConfig, build_maml, build_sampler, to_device

SETTINGS = ((5, 1), (5, 5), (20, 1), (20, 5))  # (ways, shots)
PAPER_ITERATIONS = 60_000


def iteration_cost(data_root: str, ways: int, shots: int, repeats: int, device: str) -> dict:
    config = TrainConfig(
        dataset="omniglot", data_root=data_root, ways=ways, shots=shots, split_scheme="maml"
    ).resolved()
    dev = torch.device(device)
    maml = build_maml(config).to(dev)
    optimizer = torch.optim.Adam(maml.parameters(), lr=config.meta_lr)
    sampler = build_sampler(config, "train", seed=0)

    def step() -> None:
        xs, ys, xq, yq = to_device(sampler.sample(config.meta_batch), dev)
        optimizer.zero_grad(set_to_none=True)
        maml.meta_backward(xs, ys, xq, yq)
        optimizer.step()

    step()  # warm-up: native kernel, allocator (and the counted step below)
    # Counted on the per-task path: the same arithmetic, but FlopCounterMode over-counts
    # the backward of the grouped convolutions that the task-batched path runs.
    batched, maml.batched = maml.batched, False
    with FlopCounterMode(display=False) as counter:
        step()
    maml.batched = batched
    per_iteration = median_ms(step, dev, warmup=0, repeats=repeats) / 1e3
    flops = counter.get_total_flops()
    return {
        "setting": f"{ways}-way {shots}-shot",
        "meta_batch": config.meta_batch,
        "inner_steps": config.inner_steps,
        "gflop": flops / 1e9,
        "seconds": per_iteration,
        "gflops_per_second": flops / 1e9 / per_iteration,
        "hours_for_60000": per_iteration * PAPER_ITERATIONS / 3600,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}")  # fmt: skip
    print("| setting | meta-batch | inner steps | GFLOP / iteration | s / iteration "
          "| GFLOP/s | hours for 60,000 |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for ways, shots in SETTINGS:
        r = iteration_cost(args.data_root, ways, shots, args.repeats, args.device)
        print(f"| {r['setting']} | {r['meta_batch']} | {r['inner_steps']} | {r['gflop']:.1f} "
              f"| {r['seconds']:.2f} | {r['gflops_per_second']:.0f} "
              f"| {r['hours_for_60000']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
