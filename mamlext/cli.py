"""The command line: ``mamlext train | evaluate | bench | info``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys

from mamlext.modules.norm import BN_POLICIES, QUERY_ROWS
from mamlext.train import ALGORITHMS, DATASETS, QUERY_MODES, TrainConfig


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    a = parser.add_argument
    a("--dataset", default=d.dataset, help=f"one of {', '.join(DATASETS)} (default: %(default)s)")
    a("--data-root", help="folder with Omniglot (zips, torchmeta's hdf5 root, or the npz)")
    a("--download", action="store_true", help="download Omniglot into --data-root if missing")
    a(
        "--split-scheme",
        default=d.split_scheme,
        help="Omniglot characters: vinyals (1028 train / 423 test, torchmeta's), maml (the "
        "paper's 1200 / 423) or background (964 / 659)",
    )
    a("--ways", type=int, default=d.ways)
    a("--shots", type=int, help="support examples per class (regression: points per task)")
    a(
        "--query",
        type=int,
        help="query examples per class (regression: points per task); default: --shots",
    )
    a("--meta-batch", type=int, help="tasks per meta-training step")
    a("--inner-steps", type=int, help="inner gradient steps during meta-training")
    a("--test-steps", type=int, help="inner gradient steps at meta-test")
    a("--step-size", type=float, help="inner learning rate (initial value when learned)")
    a("--first-order", action="store_true", help="drop second-order terms (FOMAML)")
    a("--algorithm", default=d.algorithm, help=f"one of {', '.join(ALGORITHMS)}")
    a(
        "--model",
        metavar="MODULE:FACTORY",
        help="the network: a callable returning any nn.Module, called with ways= for "
        "classification (default: the paper's Conv-4 or MLP)",
    )
    a(
        "--bn",
        default=d.bn,
        choices=BN_POLICIES,
        help="BatchNorm policy (docs/train_eval.md; default: %(default)s)",
    )
    a(
        "--bn-per-step-weights",
        action=argparse.BooleanOptionalAction,
        help="MAML++'s BNWB: a learned BatchNorm weight and bias per inner step (default: "
        "on for mamlpp on Omniglot)",
    )
    a(
        "--bn-query-row",
        choices=QUERY_ROWS,
        help="the per-step BatchNorm row of a query pass: own (a row of its own) or last_step "
        "(the row of the inner step just taken, as MAML++'s authors' code; mamlpp's default)",
    )
    a(
        "--multi-step-loss",
        type=int,
        metavar="N",
        help="MAML++'s multi-step loss: weight the query losses after every inner step, "
        "annealed towards the last step over the first N iterations (0: off; mamlpp: 5000)",
    )
    a(
        "--multi-step-loss-floor",
        type=float,
        default=d.multi_step_loss_floor,
        metavar="F",
        help="the multi-step loss keeps each earlier step's weight >= this / inner steps",
    )
    a(
        "--first-order-until",
        type=int,
        default=d.first_order_until,
        metavar="N",
        help="derivative-order annealing: first-order meta-gradients for the first N "
        "iterations, second order after",
    )
    a(
        "--inner-checkpoint",
        type=segment_length,
        metavar="N|auto",
        help="recompute the inner loop during backward in segments of N steps (auto: sized "
        "from a step's graph): memory that does not grow with the steps, the same meta-gradient "
        "(activation checkpointing, not the run's checkpoint.pt; docs/memory.md)",
    )
    a("--meta-lr", type=float, default=d.meta_lr, help="Adam learning rate of the outer loop")
    a(
        "--meta-lr-schedule",
        metavar="NAME",
        help="milestones (default: constant unless --meta-lr-milestones) | cosine (to "
        "--meta-lr-min over the run; mamlpp's default)",
    )
    a(
        "--meta-lr-min",
        type=float,
        default=d.meta_lr_min,
        metavar="M",
        help="the last outer learning rate of --meta-lr-schedule cosine",
    )
    a(
        "--meta-lr-milestones",
        type=int,
        nargs="+",
        default=d.meta_lr_milestones,
        metavar="N",
        help="multiply the outer learning rate by --meta-lr-gamma after N iterations",
    )
    a("--meta-lr-gamma", type=float, default=d.meta_lr_gamma, help="factor per milestone")
    a(
        "--schedule-epoch",
        type=int,
        metavar="N",
        help="the multi-step loss and the cosine rate move once per N iterations (default 1; "
        "mamlpp: 500, as its authors' epochs)",
    )
    a("--iterations", type=int, help="meta-training steps")
    a("--eval-every", type=int, help="evaluate and checkpoint every N iterations")
    a(
        "--eval-tasks",
        type=int,
        default=d.eval_tasks,
        help="meta-test tasks of the final evaluation",
    )
    a(
        "--periodic-eval-tasks",
        type=int,
        default=d.periodic_eval_tasks,
        help="meta-test tasks of each evaluation every --eval-every iterations",
    )
    a("--device", default=d.device)
    a("--seed", type=int, default=d.seed)
    a("--out", default=None, help="output folder (default: runs/<dataset>)")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--no-plot", dest="plot", action="store_false", help="skip the PNG figures")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")


def segment_length(text: str) -> int | str:
    """An ``--inner-checkpoint`` value: ``auto`` or a segment length in steps."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N (steps) or auto, got {text!r}") from None


def _config(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values.get("out") is None:
        values["out"] = f"runs/{args.dataset}"
    return TrainConfig(**values)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (schedulers, ``timeout``), raised where the job is so that it stops as on Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _train(args: argparse.Namespace) -> int:
    from mamlext.train import train

    config = _config(args)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        result = train(config)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result is None:  # a non-zero rank of a distributed job
        return 0
    final = result["final"]
    if config.regression:
        before = result["before_adaptation"]
        steps = result["config"]["test_steps"]
        print(
            f"meta-test MSE over {final['tasks']} tasks: before adaptation {before['mean']:.3f} "
            f"+- {before['ci95']:.3f}, after {steps} steps {final['mean']:.3f} +- {final['ci95']:.3f}"
        )
    else:
        print(
            f"meta-test accuracy over {final['tasks']} tasks: "
            f"{100 * final['mean']:.2f} +- {100 * final['ci95']:.2f} % (95% CI)"
        )
    print(f"results, metrics, checkpoint and plots in {result['out']}/")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mamlext.train import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, tasks=args.tasks, steps=args.steps, device=args.device, bn=args.bn,
        query_mode=args.query_mode, query=args.query,
    )  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    import torch

    import mamlext

    print(f"mamlext {mamlext.__version__}, torch {torch.__version__}")
    for device, status in mamlext.backend_info().items():
        where = f" ({status.library})" if status.library else ""
        print(f"fused_sgd on {device}: {status.kernel} kernel, {status.reason}{where}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from mamlext.bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mamlext", description="Fast, exact MAML for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="meta-train (default: sinusoid regression)",
        epilog="Exit status: 0 done; 2 an error, named on stderr (bad input, an unusable "
        "checkpoint, a diverged run, a failed write, --out in use by another run); 130 "
        "interrupted (SIGINT), 143 terminated (SIGTERM). In every case the last checkpoint "
        "written stays intact.",
    )
    _add_train_arguments(train)
    train.set_defaults(run=_train)
    evaluate = commands.add_parser("evaluate", help="meta-test a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--tasks", type=int, default=600)
    evaluate.add_argument("--steps", type=int, help="inner steps (default: the run's test steps)")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument(
        "--bn",
        choices=BN_POLICIES,
        help="BatchNorm policy at meta-test (default: the run's; another must keep no running "
        "statistics: transductive or support)",
    )
    evaluate.add_argument(
        "--query-mode",
        choices=QUERY_MODES,
        default="task",
        help="predict each query with all of its task's queries (task), alone (one), or with "
        "the other queries taken from other tasks (mixed); default: %(default)s",
    )
    evaluate.add_argument(
        "--query", type=int, help="query examples per class at meta-test (default: the run's)"
    )
    evaluate.set_defaults(run=_evaluate)
    from mamlext.bench import build_parser as add_bench_arguments

    bench = commands.add_parser("bench", help="benchmarks against the peers")
    add_bench_arguments(bench)
    bench.set_defaults(run=_bench)
    info = commands.add_parser("info", help="which kernel serves fused_sgd, and why")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mamlext.data.omniglot import CorruptDataError
    from mamlext.distributed import PeerFailure
    from mamlext.train import CheckpointError, OutFolderInUse, RunStopped

    try:
        return args.run(args)
    except (
        ValueError,
        FileNotFoundError,
        PermissionError,
        CheckpointError,
        CorruptDataError,
        PeerFailure,
        OutFolderInUse,
        RunStopped,
    ) as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"mamlext {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # 128 + the signal's number, as a shell reports it
        how, code = (
            ("terminated (SIGTERM)", 143) if isinstance(stop, _Terminated) else ("interrupted", 130)
        )
        print(f"mamlext {args.command}: {how} (the last checkpoint is intact)", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
