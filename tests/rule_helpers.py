"""Small networks, tasks and loops shared by the learning-rule tests."""

from __future__ import annotations

import numpy as np

from pnn.learning import RuleContext, get_loss
from pnn.network import DigitalLinear, PhysicalNetwork, Readout
from pnn.simulators.crossbar import CROSSBAR_PRESETS, CrossbarNode


def digital_network(sizes, activation="tanh", seed=0, readout_gain=1.0, dtype=np.float64):
    """Digital layers fc0, fc1, ... (the last one linear) and a readout."""
    layers = [
        DigitalLinear(sizes[i], sizes[i + 1], activation=activation if i < len(sizes) - 2 else "linear",
                      rng=seed + i, name=f"fc{i}", dtype=dtype)
        for i in range(len(sizes) - 1)
    ]
    return PhysicalNetwork([*layers, Readout(sizes[-1], gain=readout_gain)])


def crossbar_network(sizes, preset="default", seed=0):
    """Crossbar layers xb0, xb1, ... (the last one linear) and a readout."""
    layers = [
        CrossbarNode(sizes[i], sizes[i + 1], activation="tanh" if i < len(sizes) - 2 else "linear",
                     config=CROSSBAR_PRESETS[preset], rng=seed + i, name=f"xb{i}")
        for i in range(len(sizes) - 1)
    ]
    return PhysicalNetwork([*layers, Readout(sizes[-1])])


def crossbar_factory(n_in, n_out, name, activation):
    """Node factory for physical feedback paths: a default-preset crossbar."""
    return CrossbarNode(n_in, n_out, rng=99, name=name, activation=activation)


def make_context(n_classes, loss="cross_entropy", seed=0, node_factory=None):
    return RuleContext(rng=np.random.default_rng(seed), loss=get_loss(loss) if isinstance(loss, str) else loss,
                       n_classes=n_classes, node_factory=node_factory)


class TeacherLoss:
    """Half the squared distance to continuous targets, passed in place of the labels."""

    def __call__(self, outputs, targets):
        error = np.asarray(outputs, dtype=np.float64) - targets
        return float(0.5 * (error**2).sum(axis=1).mean()), error


def small_task(rng, n=150):
    """Inputs in [-1, 1] of shape (n, 4) and 3-class labels that depend on all four inputs."""
    x = rng.uniform(-1, 1, (n, 4))
    labels = np.argmax(x[:, :3] + 0.3 * x[:, 3:4], axis=1)
    return x, labels


def train_steps(rule, network, ctx, x, labels, steps, lr, clip=False):
    """Full-batch descent steps through the rule; return the loss of every step."""
    losses = []
    for _ in range(steps):
        result = rule.compute(network, x, labels, ctx)
        losses.append(result.loss)
        for i, grads in result.gradients.items():
            network[i].apply_update({k: -lr * g for k, g in grads.items()}, clip=clip)
        rule.after_update(network, ctx)
    return losses


def finite_difference(network, index, name, x, labels, loss, eps=1e-6):
    """Central finite-difference gradient of the batch-mean loss for one parameter array."""
    node = network[index]
    base = node.get_parameters()[name]
    grad = np.zeros_like(base)
    for k in range(base.size):
        for sign in (1, -1):
            trial = base.copy()
            trial.flat[k] += sign * eps
            node.set_parameters({name: trial})
            value, _ = loss(network.forward(x), labels)
            grad.flat[k] += sign * value / (2 * eps)
    node.set_parameters({name: base})
    return grad
