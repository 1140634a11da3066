"""A learn2learn script on current Python and torch: one line at the top, nothing else.

learn2learn's MAML loop, as its users write it (benchmark tasksets, a clone per task,
``adapt`` on the support half, the query loss back-propagated into the model), on Omniglot
5-way 1-shot with learn2learn's ``OmniglotCNN``. ``import mamlext.compat.learn2learn`` makes
``import learn2learn`` work on Python >= 3.11 (where learn2learn 0.2.0 does not install),
with mamlext's fused update in ``adapt``.

    python examples/maml_omniglot_learn2learn.py --data-root DIR [--iterations N] [--smoke]

DIR holds Omniglot's ``images_background.zip`` and ``images_evaluation.zip`` (or the
folders, directly or in ``omniglot-py/``).
"""

import mamlext.compat.learn2learn  # noqa: F401  (the one line)

# isort: split
import argparse
import random

import learn2learn as l2l
import numpy as np
import torch
from torch import nn


def fast_adapt(batch, learner, loss, steps, shots, ways):
    data, labels = batch
    support = torch.zeros(data.size(0), dtype=torch.bool)
    support[np.arange(shots * ways) * 2] = True  # even positions: one of each class's pair
    for _ in range(steps):
        learner.adapt(loss(learner(data[support]), labels[support]))
    predictions = learner(data[~support])
    accuracy = (predictions.argmax(1) == labels[~support]).float().mean()
    return loss(predictions, labels[~support]), accuracy


def main(data_root, ways=5, shots=1, meta_lr=0.003, fast_lr=0.5, meta_batch_size=32,
         adaptation_steps=1, iterations=1000, seed=42):  # fmt: skip
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tasksets = l2l.vision.benchmarks.get_tasksets(
        "omniglot", train_ways=ways, train_samples=2 * shots, test_ways=ways,
        test_samples=2 * shots, num_tasks=20000, root=data_root,
    )  # fmt: skip
    model = l2l.vision.models.OmniglotCNN(ways)
    maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), meta_lr)
    loss = nn.CrossEntropyLoss()
    for iteration in range(iterations):
        opt.zero_grad()
        train_accuracy = 0.0
        for _ in range(meta_batch_size):
            learner = maml.clone()
            error, accuracy = fast_adapt(
                tasksets.train.sample(), learner, loss, adaptation_steps, shots, ways
            )
            (error / meta_batch_size).backward()
            train_accuracy += accuracy.item() / meta_batch_size
        opt.step()
        if iteration % 50 == 0 or iteration == iterations - 1:
            print(f"iteration {iteration}: meta-train accuracy {train_accuracy:.3f}")
    test_accuracy = 0.0
    for _ in range(meta_batch_size):
        learner = maml.clone()
        _, accuracy = fast_adapt(
            tasksets.test.sample(), learner, loss, adaptation_steps, shots, ways
        )
        test_accuracy += accuracy.item() / meta_batch_size
    print(f"meta-test accuracy over {meta_batch_size} tasks: {test_accuracy:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true", help="2 iterations of 4 tasks")
    args = parser.parse_args()
    if args.smoke:
        main(args.data_root, iterations=2, meta_batch_size=4)
    else:
        main(args.data_root, iterations=args.iterations)
