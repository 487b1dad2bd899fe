"""Benchmark the resistive network's forward pass against the vectorized NumPy reference.

Run from the repository root, with pnn installed (``pip install -e .``) or on ``PYTHONPATH``:

    PYTHONPATH=. OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/bench_resistive.py

For each network shape it reports samples per second of two solvers, both measured in the same
run after a warm-up, as the median of interleaved rounds. The first is ``ResistiveNode.forward``: the
Numba Newton kernel with the default preset, read noise and the voltage-drop probes. The second
is the dense NumPy reference solve in ``pnn.simulators.resistive_reference``, batched with
``numpy.linalg.solve``. The reference computes
only the node voltages, so the ratio understates the kernel's advantage slightly.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from pnn.simulators.resistive import ResistiveNode
from pnn.simulators.resistive_reference import reference_settle_node

# (label, n_in, hidden widths, n_out): one layer as the device factory builds it, and a
# network with a hidden layer of the size equilibrium propagation on the vowels would use.
SHAPES = [
    ("layer 64 -> 32", 64, (), 32),
    ("network 12 -> 64 -> 12", 12, (64,), 12),
]


def interleaved_medians(first, second, rounds: int) -> tuple[float, float]:
    """Return the median wall time of ``first()`` and of ``second()`` over ``rounds`` rounds.

    Each round times one call of each, so that a change of load on a shared machine affects
    both alike. Two warm-up calls of each come first (Numba compiles on the first call).
    """
    for _ in range(2):
        first()
        second()
    times_first, times_second = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        first()
        times_first.append(time.perf_counter() - start)
        start = time.perf_counter()
        second()
        times_second.append(time.perf_counter() - start)
    return statistics.median(times_first), statistics.median(times_second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="examples per forward pass")
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds, each one call of both solvers")
    args = parser.parse_args()

    print(f"batch {args.batch}; median of {args.rounds} interleaved rounds after warm-up; samples per second")
    print(f"{'shape':<26}{'numba forward':>16}{'numpy reference':>18}{'speed-up':>10}{'newton steps':>14}")
    for label, n_in, hidden, n_out in SHAPES:
        node = ResistiveNode(n_in, n_out, hidden=hidden, rng=0)
        x = np.random.default_rng(1).uniform(-1.0, 1.0, (args.batch, n_in))
        kernel, reference = interleaved_medians(
            lambda: node.forward(x), lambda: reference_settle_node(node, x), args.rounds
        )
        steps = float(np.mean(node.last_iterations_))
        print(
            f"{label:<26}{args.batch / kernel:>16.0f}{args.batch / reference:>18.0f}"
            f"{reference / kernel:>9.1f}x{steps:>14.1f}"
        )


if __name__ == "__main__":
    main()
