"""Benchmark the Hopfield network's settle against a vectorized NumPy version of the same dynamics.

Run from the repository root, with pnn installed (``pip install -e .``) or on ``PYTHONPATH``:

    PYTHONPATH=. OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/bench_hopfield.py

One equilibrium propagation step on the Hopfield network settles the batch twice (the free
phase from zero states, the nudged phase from the free state) and takes the energy gradient of
both states. This script times that step three ways in the same run, after a warm-up, as the
median of interleaved rounds:

- ``HopfieldNode``: the Numba kernel, which computes ``W_1 x`` once per batch and reuses it in
  the nudged phase;
- NumPy: the same synchronous updates written with batch-major NumPy products per layer,
  computing ``W_1 x`` once per settle, as a straightforward implementation would;
- the matrix products alone (``W_1 x`` once and the two weight-gradient products), the floor
  that any implementation pays, to show what share of the step the settling loop costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from pnn.simulators.hopfield import HopfieldNode

# (label, n_in, hidden widths, n_out): the MNIST network of Scellier and Bengio 2017, and a
# deeper one.
SHAPES = [
    ("784-500-10", 784, (500,), 10),
    ("784-500-500-10", 784, (500, 500), 10),
]


def numpy_settle(weights, biases, x, state, force, step, iterations):
    """Return the states after ``iterations`` synchronous steps; lists hold one array per layer."""
    first = x @ weights[0].T
    for _ in range(iterations):
        updated = []
        for layer, here in enumerate(state):
            drive = biases[layer] + (first if layer == 0 else state[layer - 1] @ weights[layer].T)
            if layer + 1 < len(state):
                drive = drive + state[layer + 1] @ weights[layer + 1]
            if layer == len(state) - 1:
                drive = drive + force
            updated.append(np.clip(here - step * (here - drive), 0.0, 1.0))
        state = updated
    return state


def numpy_energy_gradient(x, state):
    below = x
    gradients = []
    for here in state:
        gradients.append(-(here.T @ below) / x.shape[0])
        below = here
    return gradients


def interleaved_medians(functions, rounds: int) -> list[float]:
    """Return the median wall time of each function over ``rounds`` rounds, one call each per round."""
    for _ in range(2):
        for function in functions:
            function()
    times = [[] for _ in functions]
    for _ in range(rounds):
        for function, record in zip(functions, times):
            start = time.perf_counter()
            function()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=20, help="examples per batch")
    parser.add_argument("--free", type=int, default=20, help="free-phase iterations")
    parser.add_argument("--nudged", type=int, default=4, help="nudged-phase iterations")
    parser.add_argument("--rounds", type=int, default=31, help="timed rounds")
    args = parser.parse_args()

    print(f"batch {args.batch}, {args.free} free and {args.nudged} nudged iterations; "
          f"median of {args.rounds} interleaved rounds after warm-up; ms per EP step")
    print(f"{'shape':<18}{'numba':>10}{'numpy':>10}{'speed-up':>10}{'products only':>16}")
    for label, n_in, hidden, n_out in SHAPES:
        node = HopfieldNode(n_in, n_out, hidden=hidden, rng=0, iterations=args.free, nudged_iterations=args.nudged)
        rng = np.random.default_rng(1)
        batches = [rng.uniform(0.0, 1.0, (args.batch, n_in)) for _ in range(4)]
        force = 0.1 * rng.normal(size=(args.batch, n_out))
        params = node.get_parameters()
        n_layers = len(hidden) + 1
        weights = [params[f"weight{l + 1}"] for l in range(n_layers)]
        biases = [params[f"bias{l + 1}"] for l in range(n_layers)]
        sizes = [*hidden, n_out]
        counter = iter(range(10**9))

        def numba_step():
            # A new batch each call, so that the free phase cannot reuse the last W_1 x.
            x = batches[next(counter) % len(batches)]
            free = node.settle(x)
            nudged = node.settle(x, force, initial=free)
            node.energy_gradient(free)
            node.energy_gradient(nudged)

        def numpy_step():
            x = batches[next(counter) % len(batches)]
            zeros = [np.zeros((args.batch, n)) for n in sizes]
            free = numpy_settle(weights, biases, x, zeros, np.zeros_like(force), node.step, args.free)
            nudged = numpy_settle(weights, biases, x, free, force, node.step, args.nudged)
            numpy_energy_gradient(x, free)
            numpy_energy_gradient(x, nudged)

        def products_only():
            x = batches[next(counter) % len(batches)]
            np.dot(weights[0], x.T)
            for _ in range(2):
                numpy_energy_gradient(x, [np.zeros((args.batch, n)) for n in sizes])

        numba_time, numpy_time, floor = interleaved_medians([numba_step, numpy_step, products_only], args.rounds)
        print(f"{label:<18}{1e3 * numba_time:>10.2f}{1e3 * numpy_time:>10.2f}"
              f"{numpy_time / numba_time:>9.2f}x{1e3 * floor:>16.2f}")


if __name__ == "__main__":
    main()
