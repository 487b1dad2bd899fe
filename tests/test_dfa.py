"""DFA against its oracles: exact output-layer gradient, learning from zero, alignment."""

from __future__ import annotations

import numpy as np
import pytest

from pnn.errors import ConfigError
from pnn.learning import DFA, RuleContext, get_loss, make_rule
from pnn.network import DigitalLinear, PhysicalNetwork, Readout
from pnn.simulators.crossbar import CrossbarNode


def digital_network(sizes, activation="tanh", seed=0, readout_gain=1.0):
    layers = [
        DigitalLinear(sizes[i], sizes[i + 1], activation=activation if i < len(sizes) - 2 else "linear",
                      rng=seed + i, name=f"fc{i}", dtype=np.float64)
        for i in range(len(sizes) - 1)
    ]
    return PhysicalNetwork([*layers, Readout(sizes[-1], gain=readout_gain)])


def context(n_classes, loss="cross_entropy", seed=0):
    return RuleContext(rng=np.random.default_rng(seed), loss=get_loss(loss), n_classes=n_classes)


def backprop_gradients(network, x, labels, loss):
    """Reference: exact backprop through every node's model."""
    outputs = network.forward(x)
    _, error = loss(outputs, labels)
    grads = {}
    for i in reversed(range(len(network))):
        node, state = network[i], network.states[i]
        if node.trainable:
            grads[i] = node.local_gradient(state, error)
        error = node.input_gradient(state, error)
    return grads


def finite_difference(network, index, name, x, labels, loss, eps=1e-6):
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


def test_output_update_equals_backprop(rng):
    network = digital_network([5, 7, 6, 3], readout_gain=1.7)
    x = rng.uniform(-1, 1, (9, 5))
    labels = rng.integers(0, 3, 9)
    ctx = context(3)
    rule = DFA()
    rule.setup(network, ctx)
    result = rule.compute(network, x, labels, ctx)
    reference = backprop_gradients(network, x, labels, ctx.loss)
    last = network.trainable_indices[-1]
    for name in ("weight", "bias"):
        np.testing.assert_allclose(result.gradients[last][name], reference[last][name], rtol=1e-12, atol=1e-14)
        numeric = finite_difference(network, last, name, x, labels, ctx.loss)
        np.testing.assert_allclose(result.gradients[last][name], numeric, rtol=1e-5, atol=1e-8)
    # Hidden updates differ from backprop: they use the random feedback, not W^T.
    assert not np.allclose(result.gradients[0]["weight"], reference[0]["weight"])


def test_learns_from_zero_weights(rng):
    network = digital_network([4, 16, 16, 3])
    for i in network.trainable_indices:
        node = network[i]
        node.set_parameters({k: np.zeros(s.shape) for k, s in node.parameters.items()})
    x = rng.uniform(-1, 1, (120, 4))
    labels = np.argmax(x[:, :3] + 0.3 * x[:, 3:4], axis=1)
    ctx = context(3)

    # Backprop gets no gradient into the hidden layers when every weight is zero.
    reference = backprop_gradients(network, x, labels, ctx.loss)
    assert np.all(reference[0]["weight"] == 0)
    assert np.all(reference[1]["weight"] == 0)

    rule = DFA()
    rule.setup(network, ctx)
    loss_before, _ = ctx.loss(network.forward(x), labels)
    for _ in range(300):
        result = rule.compute(network, x, labels, ctx)
        for i, grads in result.gradients.items():
            network[i].apply_update({k: -0.1 * g for k, g in grads.items()})
    loss_after, _ = ctx.loss(network.forward(x), labels)
    assert np.any(network[0].get_parameters()["weight"] != 0)
    assert loss_after < 0.5 * loss_before


def angle_degrees(a, b):
    cosine = np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b))
    return np.degrees(np.arccos(np.clip(cosine, -1, 1)))


def test_alignment_angle_falls_below_90(rng):
    # A linear network fit to a random linear map, from small weights. The angle between the
    # hidden layer's DFA error signal B e and the backprop signal (W3 W2)^T e is measured on a
    # fixed probe batch of errors every 100 steps.
    network = digital_network([10, 20, 20, 5], activation="linear", seed=3)
    for i in network.trainable_indices:
        network[i].set_parameters({"weight": 0.05 * network[i].get_parameters()["weight"]})
    teacher = rng.normal(size=(5, 10)) / np.sqrt(10)
    ctx = context(5, loss="mse")
    rule = DFA()
    rule.setup(network, ctx)
    probe_x = rng.normal(size=(64, 10))
    probe_error = rng.normal(size=(64, 5))

    def signal_angle():
        network.forward(probe_x)
        return angle_degrees(rule.paths_[0].project(probe_error), network.backward_to(0, probe_error))

    angles = [signal_angle()]
    for step in range(1, 1001):
        x = rng.normal(size=(32, 10))
        outputs = network.forward(x)
        # The loss takes class labels; against a continuous target, form the MSE error directly.
        error = outputs - x @ teacher.T
        states = network.states
        updates = {i: network[i].local_gradient(states[i], rule.paths_[i].project(error))
                   for i in network.trainable_indices[:-1]}
        last = network.trainable_indices[-1]
        updates[last] = network[last].local_gradient(states[last], error)
        for i, grads in updates.items():
            network[i].apply_update({k: -0.01 * g for k, g in grads.items()})
        if step % 100 == 0:
            angles.append(signal_angle())
    assert max(angles[1:]) < 90.0
    assert angles[-1] < angles[0] - 20.0
    # It keeps falling: no checkpoint is more than half a degree above the one before.
    assert all(later <= earlier + 0.5 for earlier, later in zip(angles, angles[1:])), angles


def test_identity_feedback_needs_matching_width():
    network = digital_network([4, 6, 3])
    with pytest.raises(ConfigError, match="identity feedback.*'fc0' has 6 outputs"):
        DFA(feedback="identity").check(network)


def test_unknown_feedback_and_rule():
    with pytest.raises(ConfigError, match="choose one of random, identity, physical"):
        DFA(feedback="mirror")
    with pytest.raises(ConfigError, match="unknown rule 'backprop'.*dfa"):
        make_rule("backprop")


def test_physical_feedback_trains_crossbar(rng):
    nodes = [CrossbarNode(4, 12, rng=1, name="h1"), CrossbarNode(12, 3, rng=2, name="out", activation="linear")]
    network = PhysicalNetwork([*nodes, Readout(3)])
    made = []

    def factory(n_in, n_out, name, activation):
        made.append(name)
        return CrossbarNode(n_in, n_out, rng=9, name=name, activation=activation)

    ctx = RuleContext(rng=np.random.default_rng(0), loss=get_loss("cross_entropy"), n_classes=3, node_factory=factory)
    rule = DFA(feedback="physical")
    rule.setup(network, ctx)
    assert made == ["feedback-h1"]
    x = rng.uniform(-1, 1, (150, 4))
    labels = np.argmax(x[:, :3], axis=1)
    first = None
    for _ in range(150):
        result = rule.compute(network, x, labels, ctx)
        first = result.loss if first is None else first
        for i, grads in result.gradients.items():
            network[i].apply_update({k: -0.05 * g for k, g in grads.items()}, clip=True)
    assert result.loss < 0.6 * first
