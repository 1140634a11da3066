"""What the MAML paper's Omniglot runs cost on this machine: FLOPs and seconds per iteration.

For each setting of Finn et al. (2017), Table 1, with plain MAML and with MAML++
(``--algorithm mamlpp``, Antoniou et al. 2019), one meta-training iteration of ``mamlext
train`` (``MAML.meta_backward`` on a meta-batch of real Omniglot tasks, then Adam) is
counted with ``torch.utils.flop_counter.FlopCounterMode`` (every forward, backward and
double-backward convolution and matmul) and timed (median of a few). MAML++ is timed
twice: with its multi-step loss (a query pass after every inner step; its first
iterations) and without (after them). The projection is simply seconds per iteration
times the paper's iterations (MAML: 60,000; MAML++: 150 epochs of 500). Timed on the
path ``mamlext train`` takes (task-batched for small tasks on a CPU).

    python benchmarks/omniglot_cost.py --data-root ../shared/data/omniglot
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch.utils.flop_counter import FlopCounterMode

from mamlext.bench.op import median_ms
from mamlext.train import TrainConfig, build_maml, build_sampler, step_weights_at, to_device

# (algorithm, ways, shots, meta-batch or None: the algorithm's, multi-step loss on)
SETTINGS = (
    ("maml", 5, 1, None, False),
    ("maml", 5, 5, None, False),
    ("maml", 5, 5, 8, False),  # the README's 5-way 5-shot run
    ("maml", 20, 1, None, False),
    ("maml", 20, 5, None, False),
    ("mamlpp", 5, 1, None, True),
    ("mamlpp", 5, 1, None, False),
    ("mamlpp", 5, 5, None, True),
    ("mamlpp", 20, 1, None, True),
    ("mamlpp", 20, 5, None, True),
)
PAPER_ITERATIONS = {"maml": 60_000, "mamlpp": 75_000}


def iteration_cost(
    data_root: str, algorithm: str, ways: int, shots: int, meta_batch: int | None,
    multi_step_loss: bool, repeats: int, device: str,
) -> dict:  # fmt: skip
    config = TrainConfig(
        dataset="omniglot", data_root=data_root, ways=ways, shots=shots, split_scheme="maml",
        algorithm=algorithm, meta_batch=meta_batch, iterations=PAPER_ITERATIONS[algorithm],
    ).resolved()  # fmt: skip
    # iteration 0: the multi-step loss's first weights; past its iterations: off
    step_weights = step_weights_at(config, 0 if multi_step_loss else config.iterations)
    dev = torch.device(device)
    maml = build_maml(config).to(dev)
    optimizer = torch.optim.Adam(maml.parameters(), lr=config.meta_lr)
    sampler = build_sampler(config, "train", seed=0)

    def step() -> None:
        xs, ys, xq, yq = to_device(sampler.sample(config.meta_batch), dev)
        optimizer.zero_grad(set_to_none=True)
        maml.meta_backward(xs, ys, xq, yq, step_weights=step_weights)
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
    loss = "multi-step loss" if step_weights else "last step's loss"
    return {
        "setting": f"{ways}-way {shots}-shot",
        "algorithm": "MAML" if algorithm == "maml" else f"MAML++ ({loss})",
        "meta_batch": config.meta_batch,
        "inner_steps": config.inner_steps,
        "gflop": flops / 1e9,
        "seconds": per_iteration,
        "gflops_per_second": flops / 1e9 / per_iteration,
        "paper_iterations": config.iterations,
        "hours_for_paper": per_iteration * config.iterations / 3600,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}")  # fmt: skip
    print("| setting | algorithm | meta-batch | inner steps | GFLOP / iteration "
          "| s / iteration | GFLOP/s | paper's iterations | hours for them |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for setting in SETTINGS:
        r = iteration_cost(args.data_root, *setting, args.repeats, args.device)
        print(f"| {r['setting']} | {r['algorithm']} | {r['meta_batch']} | {r['inner_steps']} "
              f"| {r['gflop']:.1f} | {r['seconds']:.2f} | {r['gflops_per_second']:.0f} "
              f"| {r['paper_iterations']:,} | {r['hours_for_paper']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
