"""``python -m mamlext.bench [options]`` (the benchmark), or ``--worker CONFIG PEER ...`` and
``--memory-worker PEER K`` (one measurement, as the benchmark launches it)."""

import sys

from mamlext.bench import build_parser, main, memory
from mamlext.bench.worker import worker_main

if sys.argv[1:2] == ["--worker"]:
    sys.exit(worker_main(sys.argv[2:]))
if sys.argv[1:2] == ["--memory-worker"]:
    sys.exit(memory.worker_main(sys.argv[2:]))
sys.exit(main(build_parser().parse_args()))
