"""MAML on Omniglot, written the way torchmeta's MAML example is.

Against a plain torchmeta script, mamlext changes two import lines (marked "mamlext"):
the compatibility import that lets torchmeta 1.8 run on current torch, and
``gradient_update_parameters`` with the fused inner-loop update. The model keeps
torchmeta's own Meta layers. ``--batched`` swaps the per-task loop for the
task-batched ``mamlext.MAML`` (same data, same algorithm, all tasks at once).

    python examples/maml_omniglot_torchmeta.py --folder ../shared/data/omniglot/torchmeta
"""

import argparse

# isort: off
import mamlext.compat.torchmeta  # noqa: F401  (mamlext: torchmeta on current torch; first)

# isort: on
import torch
import torch.nn.functional as F
from torch import nn
from torchmeta.datasets.helpers import omniglot
from torchmeta.modules import MetaBatchNorm2d, MetaConv2d, MetaLinear, MetaModule, MetaSequential
from torchmeta.utils.data import BatchMetaDataLoader

from mamlext import gradient_update_parameters  # mamlext: was torchmeta.utils.gradient_based


def conv_block(in_channels, out_channels):
    return MetaSequential(
        MetaConv2d(in_channels, out_channels, kernel_size=3, padding=1),
        MetaBatchNorm2d(out_channels, momentum=1.0, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class ConvolutionalNeuralNetwork(MetaModule):
    def __init__(self, in_channels, out_features, hidden_size=64):
        super().__init__()
        self.features = MetaSequential(
            conv_block(in_channels, hidden_size),
            conv_block(hidden_size, hidden_size),
            conv_block(hidden_size, hidden_size),
            conv_block(hidden_size, hidden_size),
        )
        self.classifier = MetaLinear(hidden_size, out_features)

    def forward(self, inputs, params=None):
        features = self.features(inputs, params=self.get_subdict(params, "features"))
        return self.classifier(
            features.view(features.size(0), -1), params=self.get_subdict(params, "classifier")
        )


def accuracy(logits, targets):
    return (logits.argmax(dim=-1) == targets).float().mean()


def train_per_task(model, batch, args):
    """torchmeta's loop: adapt and evaluate one task at a time."""
    train_inputs, train_targets = (t.to(args.device) for t in batch["train"])
    test_inputs, test_targets = (t.to(args.device) for t in batch["test"])
    outer_loss = torch.tensor(0.0, device=args.device)
    acc = torch.tensor(0.0, device=args.device)
    for xs, ys, xq, yq in zip(train_inputs, train_targets, test_inputs, test_targets):
        params = None
        for _ in range(args.num_steps):
            inner_loss = F.cross_entropy(model(xs, params=params), ys)
            model.zero_grad()
            params = gradient_update_parameters(
                model,
                inner_loss,
                params=params,
                step_size=args.step_size,
                first_order=args.first_order,
            )
        test_logits = model(xq, params=params)
        outer_loss += F.cross_entropy(test_logits, yq)
        with torch.no_grad():
            acc += accuracy(test_logits, yq)
    return outer_loss / args.batch_size, acc / args.batch_size


def batched_model(args):
    """The same network from mamlext's layers, so that all tasks run at once."""
    from mamlext.models import conv4

    return conv4(args.num_ways, pool=True, hidden=args.hidden_size)


def main(args):
    dataset = omniglot(
        args.folder, shots=args.num_shots, ways=args.num_ways, shuffle=True,
        test_shots=15, meta_train=True, download=args.download,
    )  # fmt: skip
    dataloader = BatchMetaDataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers
    )
    torch.manual_seed(args.seed)
    if args.batched:
        import mamlext

        maml = mamlext.MAML(
            batched_model(args), step_size=args.step_size, num_steps=args.num_steps,
            first_order=args.first_order, batched=True,
        ).to(args.device)  # fmt: skip
        parameters = maml.parameters()
    else:
        model = ConvolutionalNeuralNetwork(1, args.num_ways, hidden_size=args.hidden_size).to(
            args.device
        )
        parameters = model.parameters()
    meta_optimizer = torch.optim.Adam(parameters, lr=1e-3)

    for batch_idx, batch in enumerate(dataloader):
        if batch_idx >= args.num_batches:
            break
        if args.batched:
            xs, ys = (t.to(args.device) for t in batch["train"])
            xq, yq = (t.to(args.device) for t in batch["test"])
            outer_loss, logits = maml(xs, ys, xq, yq)
            acc = accuracy(logits, yq)
        else:
            outer_loss, acc = train_per_task(model, batch, args)
        meta_optimizer.zero_grad()
        outer_loss.backward()
        meta_optimizer.step()
        print(
            f"batch {batch_idx + 1}/{args.num_batches}: loss {outer_loss.item():.4f} accuracy {acc.item():.4f}"
        )
    return acc.item()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="MAML on Omniglot (torchmeta-style script)")
    parser.add_argument("--folder", required=True, help="torchmeta data root (with omniglot/)")
    parser.add_argument("--num-shots", type=int, default=5)
    parser.add_argument("--num-ways", type=int, default=5)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--step-size", type=float, default=0.4)
    parser.add_argument("--num-steps", type=int, default=1)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-batches", type=int, default=100)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batched", action="store_true", help="task-batched mamlext.MAML")
    parser.add_argument("--smoke", action="store_true", help="a few small batches, seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_batches, args.batch_size, args.hidden_size, args.num_workers = 3, 2, 8, 0
    return args


if __name__ == "__main__":
    main(parse_args())
