"""Benchmark the resistive network's forward pass against the vectorized NumPy reference.

Run from the repository root, with pnn installed (``pip install -e .``) or on ``PYTHONPATH``:

    PYTHONPATH=. OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/bench_resistive.py

For each network shape it reports samples per second of two solvers, both measured in the same
run after a warm-up, as the median of repeats. The first is ``ResistiveNode.forward``: the
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


def median_seconds(function, repeats: int) -> float:
    """Return the median wall time of ``function()`` over ``repeats`` calls, after two warm-up calls."""
    function()
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="examples per forward pass")
    parser.add_argument("--repeats", type=int, default=21, help="timed repeats of the Numba forward pass")
    parser.add_argument("--reference-repeats", type=int, default=5, help="timed repeats of the NumPy reference")
    args = parser.parse_args()

    print(f"batch {args.batch}; median of repeats after warm-up; samples per second")
    print(f"{'shape':<26}{'numba forward':>16}{'numpy reference':>18}{'speed-up':>10}{'newton steps':>14}")
    for label, n_in, hidden, n_out in SHAPES:
        node = ResistiveNode(n_in, n_out, hidden=hidden, rng=0)
        x = np.random.default_rng(1).uniform(-1.0, 1.0, (args.batch, n_in))
        kernel = median_seconds(lambda: node.forward(x), args.repeats)
        steps = float(np.mean(node.last_iterations_))
        reference = median_seconds(lambda: reference_settle_node(node, x), args.reference_repeats)
        print(
            f"{label:<26}{args.batch / kernel:>16.0f}{args.batch / reference:>18.0f}"
            f"{reference / kernel:>9.1f}x{steps:>14.1f}"
        )


if __name__ == "__main__":
    main()
