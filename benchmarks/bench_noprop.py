"""Benchmark NoProp-DT: peak memory per training step against backprop, and parallel blocks.

Run from the repository root, with pnn installed (``pip install -e .``) or on ``PYTHONPATH``:

    PYTHONPATH=. OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/bench_noprop.py

Inputs are MNIST-shaped (784 features in [0, 1], 10 classes, batch 128) but random, since
neither memory nor speed depends on the values. Blocks are the MLP denoisers of
``--device digital`` (branches of ``--width`` units and one head layer), float32.

Memory. tracemalloc traces every Python allocation, NumPy's array buffers included; it leaves
out the interpreter, the imported libraries and BLAS work space. The report gives the peak
traced memory during one training step above what was traced before the step (the transient:
activations, gradients, optimizer temporaries), after one warm-up step so that node states and
Adam moments already exist. Three ways to train the same T blocks are measured:

- ``backprop``: the T blocks composed as in inference (posterior means, no noise), the
  classifier's cross-entropy back-propagated through all of them, every node updated;
- ``noprop, whole step``: one NoProp-DT step as ``pnn train --rule noprop-dt`` runs it in one
  process: every block's gradient first, then every update;
- ``noprop, block by block``: each block's gradient and update before the next block starts,
  which is what one worker process does with its blocks.

Speed. The controller trains one epoch of ``--steps`` batches with the blocks in this process
(``workers=0``) and in worker processes. Each setting is timed after one warm-up epoch in the
same run, and worker start-up is excluded.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import tracemalloc

import numpy as np

from pnn.config import TrainConfig, resolve_config
from pnn.controller import PhysicalNoProp
from pnn.datasets import Dataset
from pnn.learning.base import RuleContext
from pnn.learning.losses import CrossEntropy, one_hot
from pnn.learning.noprop import NoPropDT, simplex_backward, simplex_prediction, train_block
from pnn.learning.optim import make_optimizer

N_FEATURES, N_CLASSES, BATCH = 784, 10, 128


def synthetic(n: int, seed: int = 0) -> Dataset:
    """Return a random MNIST-shaped dataset of ``n`` training examples."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (n, N_FEATURES)).astype(np.float32)
    y = rng.integers(0, N_CLASSES, n).astype(np.int64)
    return Dataset("synthetic", x, y, x[:BATCH], y[:BATCH], N_CLASSES, tuple(map(str, range(N_CLASSES))), "random")


def build(T: int, width: int, n: int, device: str = "digital", workers: int = 0):
    """Return (network, rule, config, dataset) for T blocks of the given device."""
    config = resolve_config(TrainConfig(
        dataset="mnist", rule="noprop-dt", device=device, hidden=[width, width], batch_size=BATCH,
        rule_options={"T": T, "workers": workers},
    ))
    dataset = synthetic(n)
    network, _ = NoPropDT.build_network(config, dataset)
    return network, NoPropDT(T=T, workers=workers), config, dataset


# ------------------------------------------------------------------------------- memory
class Trainer:
    """One network with Adam per trainable node, and three ways to take a training step."""

    def __init__(self, T: int, width: int) -> None:
        self.network, self.rule, _, dataset = build(T, width, BATCH)
        self.context = RuleContext(rng=np.random.default_rng(0), loss=CrossEntropy(), n_classes=N_CLASSES)
        self.optimizers = {i: make_optimizer("adam", 1e-3) for i in self.network.trainable_indices}
        self.context.optimizers = self.optimizers
        self.rule.setup(self.network, self.context)
        self.x, self.y = dataset.x_train, dataset.y_train

    def _update(self, index: int, grads) -> None:
        node = self.network[index]
        node.apply_update(self.optimizers[index].step(grads), clip=True)

    def noprop_whole_step(self) -> None:
        result = self.rule.compute(self.network, self.x, self.y, self.context)
        for i, grads in result.gradients.items():
            self._update(i, grads)

    def noprop_block_by_block(self) -> None:
        network = self.network
        x = network.encode(self.x)
        u = network.embedding.matrix[self.y]
        for t, denoiser in enumerate(network.blocks.denoisers, start=1):
            ab = network.alpha_bar[t - 1]
            z = np.sqrt(ab) * u + np.sqrt(1 - ab) * self.context.rng.standard_normal(u.shape)
            outcome, _ = train_block(denoiser, x, z, self.y, network.embedding.matrix, self.rule.weights_[t - 1], False)
            for name, grads in outcome.gradients.items():
                self._update(network.index_of(name), grads)
            del outcome

    def backprop_step(self) -> None:
        """Cross-entropy of the composed blocks, back-propagated through every block."""
        network = self.network
        x = network.encode(self.x)
        embeddings = network.embedding.matrix
        a, b, _ = network.coefficients
        denoisers = network.blocks.denoisers
        z = self.context.rng.standard_normal((len(self.y), embeddings.shape[1]))
        probabilities = []
        features = [d.features(x) for d in denoisers]
        for t, denoiser in enumerate(denoisers):
            p, u_hat = simplex_prediction(denoiser.forward(features[t], z), embeddings)
            probabilities.append(p)
            z = a[t] * u_hat + b[t] * z
        logits = network.classifier.forward(z)
        _, error = CrossEntropy()(logits, self.y)
        state = network.classifier.measure_state()
        grads = {network.index_of("classifier"): network.classifier.local_gradient(state, error)}
        z_error = network.classifier.input_gradient(state, error)
        for t in range(len(denoisers) - 1, -1, -1):
            logits_error = simplex_backward(probabilities[t], embeddings, a[t] * z_error)
            node_grads, through_z = denoisers[t].backward(logits_error, want_z_error=True)
            grads.update({network.index_of(name): g for name, g in node_grads.items()})
            z_error = b[t] * z_error + through_z
        for i, g in grads.items():
            self._update(i, g)


def transient_peak(step) -> float:
    """Return the peak traced memory during ``step()`` above the memory traced before it, in MiB."""
    step()  # warm-up: node states and optimizer moments exist from here on
    gc.collect()
    before, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    step()
    _, peak = tracemalloc.get_traced_memory()
    return (peak - before) / 2**20


def measure_memory(depths: list[int], width: int) -> None:
    print(f"\nPeak traced memory during one training step above the memory held before it (MiB), "
          f"batch {BATCH}, blocks of width {width}")
    print(f"{'T':>4}{'backprop':>12}{'noprop, whole step':>22}{'noprop, block by block':>26}")
    tracemalloc.start()
    for T in depths:
        values = []
        for method in ("backprop_step", "noprop_whole_step", "noprop_block_by_block"):
            trainer = Trainer(T, width)
            values.append(transient_peak(getattr(trainer, method)))
            del trainer
            gc.collect()
        print(f"{T:>4}{values[0]:>12.1f}{values[1]:>22.1f}{values[2]:>26.1f}")
    tracemalloc.stop()


# -------------------------------------------------------------------------------- speed
def epoch_seconds(T: int, width: int, steps: int, device: str, workers: int, rounds: int) -> float:
    """Return the median training time of one epoch of ``steps`` batches, after a warm-up epoch."""
    network, rule, _, dataset = build(T, width, steps * BATCH, device=device, workers=workers)
    try:
        times = []
        for _ in range(rounds + 1):
            controller = PhysicalNoProp(network, rule, epochs=1, batch_size=BATCH, progress=False)
            controller.fit(dataset.x_train, dataset.y_train)
            times.append(controller.train_seconds_)
        return statistics.median(times[1:])
    finally:
        network.close()


def measure_speed(T: int, width: int, steps: int, worker_counts: list[int], rounds: int) -> None:
    print(f"\nTraining time per epoch of {steps} batches of {BATCH}, T = {T}, median of {rounds} after a warm-up")
    print(f"{'blocks':<10}{'workers':>8}{'seconds':>10}{'speed-up':>10}")
    for device in ("digital", "crossbar"):
        serial = epoch_seconds(T, width, steps, device, 0, rounds)
        print(f"{device:<10}{0:>8}{serial:>10.2f}{1.0:>9.2f}x")
        for workers in worker_counts:
            seconds = epoch_seconds(T, width, steps, device, workers, rounds)
            print(f"{device:<10}{workers:>8}{seconds:>10.2f}{serial / seconds:>9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[5, 10, 20], help="numbers of blocks T for the memory table")
    parser.add_argument("--width", type=int, default=256, help="width of each block's branches and head")
    parser.add_argument("--steps", type=int, default=40, help="batches per timed epoch")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per setting")
    parser.add_argument("--skip-speed", action="store_true", help="measure memory only")
    parser.add_argument("--skip-memory", action="store_true", help="measure speed only")
    args = parser.parse_args()

    print(f"CPU cores: {os.cpu_count()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    if not args.skip_memory:
        measure_memory(args.depths, args.width)
    if not args.skip_speed:
        measure_speed(10, args.width, args.steps, args.workers, args.rounds)


if __name__ == "__main__":
    main()
