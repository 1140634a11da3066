"""learn2learn's own MAML examples, run unchanged but for one import line, short.

Runs ``examples/vision/maml_omniglot.py`` or ``examples/maml_sine.py`` of a learn2learn
v0.2.0 checkout (``--source``): with ``--shim``, the file with ``import
mamlext.compat.learn2learn`` as its first line (here, on Python >= 3.11); without it, as
it is, under the real learn2learn (Python 3.10). The example's ``main`` is called with a
short run's settings; what it prints is parsed into a JSON record (``--out``).

For the real learn2learn's Omniglot, the data folder's zips are not the ones torchvision
knows the md5 of (they were zipped again), so torchvision's integrity check is bypassed in
this driver; it then reads the extracted folders. learn2learn's sine example reads
torchmeta, made importable on current torch by ``mamlext.compat.torchmeta`` in both runs,
and seeded from torch (``seed_from_torch``) so that a seed repeats a run.

    HOME=DIR python benchmarks/learn2learn_examples.py --source L2L --example omniglot \\
        --iterations 300 --seed 42 [--shim] --out run.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

EXAMPLES = {"omniglot": "examples/vision/maml_omniglot.py", "sine": "examples/maml_sine.py"}
SHIM_LINE = "import mamlext.compat.learn2learn\n"


def load_example(source: Path, example: str, shim: bool):
    text = (source / EXAMPLES[example]).read_text()
    if shim:
        text = SHIM_LINE + text
    folder = Path(tempfile.mkdtemp())
    path = folder / "example.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)


def parse(example: str, printed: str) -> dict:
    if example == "omniglot":
        series = {
            key: [float(v) for v in re.findall(rf"^Meta {key} ([-\d.e]+)$", printed, re.M)]
            for key in ("Train Error", "Train Accuracy", "Valid Error", "Valid Accuracy",
                        "Test Error", "Test Accuracy")
        }  # fmt: skip
        return series
    found = re.findall(r"^Iteration: (\d+) Meta Train Loss ([-\d.e]+)$", printed, re.M)
    return {"iteration": [int(i) for i, _ in found], "loss": [float(v) for _, v in found]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="a learn2learn checkout")
    parser.add_argument("--example", choices=list(EXAMPLES), required=True)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--shim", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    if args.example == "sine":
        import mamlext.compat.torchmeta as torchmeta_compat

        torchmeta_compat.seed_from_torch()
    elif not args.shim:
        import torchvision.datasets

        torchvision.datasets.Omniglot._check_integrity = lambda self: True
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    module = load_example(args.source, args.example, args.shim)
    import learn2learn

    buffer = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(Tee(sys.stdout, buffer)):
        if args.example == "omniglot":
            module.main(num_iterations=args.iterations, cuda=False, seed=args.seed)
        else:
            module.main(num_tasks=16 * args.iterations)
    record = {
        "example": args.example, "shim": args.shim, "seed": args.seed,
        "iterations": args.iterations, "seconds": time.perf_counter() - started,
        "learn2learn": getattr(learn2learn, "__version__", "?"),
        "python": sys.version.split()[0], "torch": torch.__version__,
        **parse(args.example, buffer.getvalue()),
    }  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
