"""``mamlext bench``: one second-order MAML meta-training step, mamlext against its peers.

What is measured, for every (config, peer) pair, on one machine in one run:

* **step time**: one meta-training step = for every task, the inner loop on its support
  set (second order) and its query loss; the mean over tasks; backward; an Adam step
  (lr 1e-3) on the meta-parameters. The median over ``repeats`` steps after ``warmup``
  steps (``time.perf_counter`` on a CPU, CUDA events with synchronisation on a GPU).
  ``speed-up`` is higher's median over the peer's (> 1: faster than higher).
* **peak memory**: on a CPU the peak RSS increase over the RSS just before the first step
  (the kernel's high-water mark, reset before the first step through
  ``/proc/self/clear_refs``; ``ru_maxrss`` where that is impossible); on CUDA
  ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``.
* **correctness**: ``||g - g_higher|| / ||g_higher||`` over all meta-gradients
  concatenated, from the initial weights on the benchmark batch, in float32 (TF32 off),
  and in float64 for the configs of ``FLOAT64_CONFIGS``.

Every peer starts from the same weights (a seeded plain ``nn`` Conv-4 whose state_dict is
loaded into the others) and sees the same random batch; BatchNorm uses batch statistics.
Each pair runs in a fresh subprocess (``python -m mamlext.bench --worker CONFIG PEER``,
which prints one JSON line) so that its peak RSS is its own; a peer that fails or times
out gets a row with its error. The op microbenchmark (:mod:`mamlext.bench.op`) runs too.

Modules: ``cli`` (the command line), ``configs`` (episode shapes, seed model, batch),
``peers`` (the peer builders and the plan), ``worker`` (the subprocess worker and memory
meter), ``report`` (tables, CSV, chart, header lines of both benchmarks), ``op`` (the
fused-op microbenchmark), ``memory`` (``--memory``), ``load`` (``--load``).

    mamlext bench [--quick] [--device cpu|cuda] [--out DIR]
    python benchmarks/bench_maml.py [--quick] [--configs A C] [--peers higher mamlext]
"""

from mamlext.bench.cli import build_parser, header, main, versions_line
from mamlext.bench.configs import CONFIGS, FULL_CONFIGS, QUICK_CONFIGS, Config
from mamlext.bench.peers import PEERS, QUICK_PEERS, PeerUnavailable, plan
from mamlext.bench.report import add_speedups, markdown, plot, write_csv
from mamlext.bench.worker import run, run_worker

__all__ = [
    "CONFIGS", "FULL_CONFIGS", "PEERS", "QUICK_CONFIGS", "QUICK_PEERS", "Config",
    "PeerUnavailable", "add_speedups", "build_parser", "header", "main", "markdown", "plan",
    "plot", "run", "run_worker", "versions_line", "write_csv",
]  # fmt: skip
