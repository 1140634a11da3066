"""MAML on Omniglot in the style of higher's maml-omniglot example.

The one mamlext line is ``import mamlext.higher``: from then on
``higher.innerloop_ctx(net, torch.optim.SGD(...))`` updates every parameter with ONE
fused, twice-differentiable call per inner step. Data come from ``mamlext.data``
(no torchmeta or torchvision needed).

    python examples/maml_higher.py --data-root ../shared/data/omniglot
"""

import argparse

import higher
import torch
import torch.nn.functional as F
from torch import nn

import mamlext.higher  # noqa: F401  (mamlext: the fused inner-loop SGD)
from mamlext.data import omniglot_tasks


def make_net(ways, hidden=64):
    def block(c_in):
        return [
            nn.Conv2d(c_in, hidden, 3),
            nn.BatchNorm2d(hidden, momentum=1.0, affine=True),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        ]

    return nn.Sequential(
        *block(1), *block(hidden), *block(hidden), nn.Flatten(), nn.Linear(hidden, ways)
    )


def train_step(net, meta_opt, batch, args):
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    inner_opt = torch.optim.SGD(net.parameters(), lr=args.inner_lr)
    meta_opt.zero_grad()
    losses, accuracies = [], []
    for t in range(xs.shape[0]):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(args.inner_steps):
                diffopt.step(F.cross_entropy(fnet(xs[t]), ys[t]))
            logits = fnet(xq[t])
            loss = F.cross_entropy(logits, yq[t])
            loss.backward()  # accumulates this task's meta-gradient into net's parameters
            losses.append(loss.item())
            accuracies.append((logits.argmax(-1) == yq[t]).float().mean().item())
    meta_opt.step()
    return sum(losses) / len(losses), sum(accuracies) / len(accuracies)


def main(args):
    torch.manual_seed(args.seed)
    tasks = omniglot_tasks(
        args.data_root, "train", args.ways, args.shots, args.query, seed=args.seed
    )
    net = make_net(args.ways, args.hidden)
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(args.steps):
        loss, acc = train_step(net, meta_opt, tasks.sample(args.meta_batch), args)
        print(f"step {step + 1}/{args.steps}: query loss {loss:.4f} accuracy {acc:.4f}")
    return acc


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="MAML with higher (+ mamlext's fused SGD)")
    parser.add_argument(
        "--data-root", required=True, help="Omniglot folder (npz, zips or torchmeta root)"
    )
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few small steps, seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.meta_batch, args.hidden, args.inner_steps = 3, 2, 8, 2
    return args


if __name__ == "__main__":
    main(parse_args())
