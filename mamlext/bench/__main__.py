"""``python -m mamlext.bench [options]`` (the benchmark) or ``--worker CONFIG PEER ...``
(one measurement, as the benchmark launches it)."""

import sys

from mamlext.bench import build_parser, main
from mamlext.bench.worker import worker_main

if sys.argv[1:2] == ["--worker"]:
    sys.exit(worker_main(sys.argv[2:]))
sys.exit(main(build_parser().parse_args()))
