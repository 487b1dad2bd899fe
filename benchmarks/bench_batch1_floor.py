"""The fastest any per-example learning rule could train the 784-256-256-10 network at batch 1.

A rule that updates every weight after every example has to read all of them in the forward
pass and read and write all of them in the update. This script times only that, in two fused
Numba loops per layer (a matrix-vector product and a rank-one update, float32, no error
projection, no checks, no simulator), and compares it with PyTorch backprop at batch 1 in the
same process. The ratio bounds what pnn's batch-1 path could reach against PyTorch here.

    OMP_NUM_THREADS=1 python benchmarks/bench_batch1_floor.py
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit

from pnn.benchmark import WIDTHS, torch_throughput


@njit(cache=True, fastmath=True)
def _matvec(w, h, out):
    for i in range(w.shape[0]):
        acc = np.float32(0.0)
        for j in range(w.shape[1]):
            acc += w[i, j] * h[j]
        out[i] = acc


@njit(cache=True, fastmath=True)
def _rank_one_update(w, d, h, lr):
    for i in range(w.shape[0]):
        scale = lr * d[i]
        for j in range(w.shape[1]):
            w[i, j] -= scale * h[j]


def floor_throughput(n_samples: int = 5000) -> float:
    """Return samples per second of the forward products and rank-one updates alone."""
    rng = np.random.default_rng(0)
    weights = [rng.random((n_out, n_in), dtype=np.float32) for n_in, n_out in zip(WIDTHS[:-1], WIDTHS[1:])]
    inputs = [rng.random(n, dtype=np.float32) for n in WIDTHS[:-1]]
    outputs = [np.empty(n, dtype=np.float32) for n in WIDTHS[1:]]
    lr = np.float32(1e-3)

    def one_example() -> None:
        for w, h, out in zip(weights, inputs, outputs):
            _matvec(w, h, out)
        for w, h, out in zip(weights, inputs, outputs):
            _rank_one_update(w, out, h, lr)

    one_example()  # compile
    best = np.inf
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n_samples):
            one_example()
        best = min(best, time.perf_counter() - started)
    return n_samples / best


def main() -> None:
    floor = floor_throughput()
    torch_rate = torch_throughput(1, 2000, 5)
    print(f"forward products and rank-one updates only: {floor:,.0f} samples/s")
    if torch_rate is None:
        print("PyTorch backprop at batch 1: missing (pip install 'pnn-lab[bench]')")
    else:
        print(f"PyTorch backprop at batch 1: {torch_rate:,.0f} samples/s; ratio {floor / torch_rate:.1f}")


if __name__ == "__main__":
    main()
