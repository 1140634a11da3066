"""Entry point: ``python benchmarks/bench_op.py [--device cpu|cuda] [--quick] ...``.

The benchmark itself lives in :mod:`mamlext.bench.op` so that ``mamlext bench`` can run
it from an installed package.
"""

from mamlext.bench.op import main

if __name__ == "__main__":
    main()
