"""Helpers shared by the optical simulator tests: a toy task and a plain DFA training loop."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pnn.learning import DFA, Adam, CrossEntropy, RuleContext
from pnn.network import Encoder, PhysicalNetwork, Readout
from pnn.nodes import Node

#: Builds one physical layer: (n_in, n_out, name, activation, rng) -> Node.
LayerMaker = Callable[[int, int, str, str, np.random.Generator], Node]


def toy_blobs(rng: np.random.Generator, n_per_class: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Return 3 Gaussian classes in 4 dimensions: data (n, 4) and labels (n,)."""
    centres = np.array([[2.0, 0.0, 0.0, 1.0], [-1.0, 2.0, 0.0, -1.0], [-1.0, -2.0, 1.0, 0.0]])
    x = np.concatenate([c + 0.6 * rng.standard_normal((n_per_class, 4)) for c in centres])
    y = np.repeat(np.arange(3), n_per_class)
    return x, y


def train_dfa(make_layer: LayerMaker, x: np.ndarray, y: np.ndarray, *, hidden: int, epochs: int, lr: float,
              seed: int = 0, batch: int = 16, readout_gain: float = 2.0) -> tuple[float, float]:
    """Train Encoder -> layer -> layer -> Readout with DFA and Adam; return (initial, final) accuracy."""
    rng = np.random.default_rng(seed)
    n_classes = int(y.max()) + 1
    encoder = Encoder(x.shape[1]).fit(x)
    first = make_layer(x.shape[1], hidden, "hidden", "tanh", rng)
    second = make_layer(hidden, n_classes, "output", "linear", rng)
    network = PhysicalNetwork([encoder, first, second, Readout(n_classes, gain=readout_gain)])
    rule = DFA()
    context = RuleContext(rng=rng, loss=CrossEntropy(), n_classes=n_classes)
    rule.setup(network, context)
    optimizers = {i: Adam(lr) for i in network.trainable_indices}

    initial = float(np.mean(network.predict(x).argmax(axis=1) == y))
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            result = rule.compute(network, x[rows], y[rows], context)
            for index, gradient in result.gradients.items():
                network[index].apply_update(optimizers[index].step(gradient), clip=True)
    final = float(np.mean(network.predict(x).argmax(axis=1) == y))
    return initial, final
