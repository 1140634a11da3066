"""The sinusoid regression of the MAML paper (Finn et al., 2017, section 5.1).

K = 10 points per task, a 1-40-40-1 ReLU network, one inner step of 0.01, meta-batch 25,
Adam 1e-3. Writes a plot of the fits before adaptation and after 1 and 10 steps
against the true curve.

    python examples/sinusoid.py --iterations 10000 --plot sinusoid.png
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import mamlext
from mamlext.data import Sinusoid
from mamlext.models import mlp
from mamlext.train.plots import regression_fits


def main(args):
    torch.manual_seed(args.seed)
    maml = mamlext.MAML(
        mlp((1, 40, 40, 1)), step_size=0.01, num_steps=1, num_test_steps=10, loss_fn=F.mse_loss
    )
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    tasks = Sinusoid(shots=args.shots, test_shots=args.shots, seed=args.seed)
    for iteration in range(1, args.iterations + 1):
        (xs, ys), (xq, yq) = tasks.sample(args.meta_batch).values()
        loss, _ = maml(xs, ys, xq, yq)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if iteration % max(args.iterations // 10, 1) == 0:
            print(f"iteration {iteration}: query MSE after one step {loss.item():.3f}")

    maml.eval()
    test = Sinusoid(shots=args.shots, test_shots=100, seed=args.seed + 1)
    (xs, ys), (xq, yq) = test.sample(100).values()
    results = {}
    for steps in (0, 1, 10):
        with torch.no_grad():
            results[steps] = maml(xs, ys, xq, yq, num_steps=steps)[0].item()
    print("meta-test MSE: " + ", ".join(f"{k} steps {v:.3f}" for k, v in results.items()))
    if args.plot:
        print(f"plot: {regression_fits(maml, test, Path(args.plot), torch.device('cpu'))}")
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="MAML sinusoid regression")
    parser.add_argument("--iterations", type=int, default=10000)
    parser.add_argument("--meta-batch", type=int, default=25)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="sinusoid.png", help="PNG path ('' for none)")
    parser.add_argument("--smoke", action="store_true", help="a few iterations, seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.iterations = 50
    return args


if __name__ == "__main__":
    main(parse_args())
