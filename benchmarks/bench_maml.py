"""Entry point: ``python benchmarks/bench_maml.py [--quick] [--device cpu|cuda] [--out DIR]``.

The benchmark itself (peers, configs, workers, tables, chart) lives in :mod:`mamlext.bench`,
so that ``mamlext bench`` runs the same code from an installed package. Extra options:
``--configs``, ``--peers`` (only those), ``--timeout`` (seconds per measurement) and
``--skip-op`` (no op microbenchmark).
"""

import sys
from pathlib import Path

from mamlext.bench import build_parser, main

if __name__ == "__main__":
    parser = build_parser()
    parser.set_defaults(out=str(Path(__file__).resolve().parent / "results"))  # this checkout's
    sys.exit(main(parser.parse_args()))
