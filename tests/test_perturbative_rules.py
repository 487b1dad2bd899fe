"""Perturbative rules (wp, np, spsa, mgd) against their oracles, restoring, and bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pnn.config import TrainConfig
from pnn.controller import PhysicalNoProp
from pnn.errors import ConfigError, MeasurementError
from pnn.experiment import train
from pnn.learning import MGD, SPSA, NodePerturbation, RuleContext, WeightPerturbation, get_loss, make_rule
from pnn.learning.perturbation import per_example_losses
from pnn.network import DigitalLinear, PhysicalNetwork, Readout
from pnn.simulators.crossbar import CrossbarNode


def digital_network(sizes, activation="tanh", seed=0, dtype=np.float64):
    layers = [
        DigitalLinear(sizes[i], sizes[i + 1], activation=activation if i < len(sizes) - 2 else "linear",
                      rng=seed + i, name=f"fc{i}", dtype=dtype)
        for i in range(len(sizes) - 1)
    ]
    return PhysicalNetwork([*layers, Readout(sizes[-1])])


def context(n_classes, loss="cross_entropy", seed=0):
    return RuleContext(rng=np.random.default_rng(seed), loss=get_loss(loss), n_classes=n_classes)


def backprop_gradients(network, x, labels, loss):
    outputs = network.forward(x)
    _, error = loss(outputs, labels)
    grads = {}
    for i in reversed(range(len(network))):
        node, state = network[i], network.states[i]
        if node.trainable:
            grads[i] = node.local_gradient(state, error)
        error = node.input_gradient(state, error)
    return grads


def flat(gradients):
    return np.concatenate([g.ravel() for i in sorted(gradients) for _, g in sorted(gradients[i].items())])


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def central_differences(network, x, labels, loss, eps=1e-6):
    grads = {}
    for i in network.trainable_indices:
        node = network[i]
        grads[i] = {}
        for name, base in node.get_parameters().items():
            grad = np.zeros_like(base)
            for k in range(base.size):
                for sign in (1, -1):
                    trial = base.copy()
                    trial.flat[k] += sign * eps
                    node.set_parameters({name: trial})
                    grad.flat[k] += sign * loss(network.forward(x), labels)[0] / (2 * eps)
            node.set_parameters({name: base})
            grads[i][name] = grad
    return grads


def quadratic_problem(n_in, rng):
    """A linear layer under the squared error: the loss is a quadratic in its parameters."""
    network = digital_network([n_in, 1], activation="linear", seed=3)
    x = rng.normal(size=(16, n_in))
    labels = np.zeros(16, dtype=int)
    return network, x, labels, context(1, loss="mse")


# ------------------------------------------------------------------------------- oracles
def test_spsa_mean_aligns_with_gradient(rng):
    network = digital_network([5, 3], activation="linear", seed=1)
    x = rng.normal(size=(16, 5))
    labels = rng.integers(0, 3, 16)
    ctx = context(3, loss="mse")
    rule = SPSA(perturbation=1e-3, directions=2000, alpha=0.0, gamma=0.0)
    rule.setup(network, ctx)
    estimate = flat(rule.compute(network, x, labels, ctx).gradients)
    truth = flat(backprop_gradients(network, x, labels, ctx.loss))
    assert cosine(estimate, truth) > 0.99


def spsa_normalized_variance(n_in, rng, draws=400):
    network, x, labels, ctx = quadratic_problem(n_in, rng)
    truth = flat(backprop_gradients(network, x, labels, ctx.loss))
    rule = SPSA(perturbation=1e-3, directions=1, alpha=0.0, gamma=0.0)
    rule.setup(network, ctx)
    errors = [np.sum((flat(rule.compute(network, x, labels, ctx).gradients) - truth) ** 2) for _ in range(draws)]
    return float(np.mean(errors) / np.sum(truth**2)), truth.size


def test_spsa_variance_grows_with_parameters(rng):
    # On a quadratic, E||g_hat - g||^2 = (N - 1) ||g||^2 for Rademacher directions.
    small, n_small = spsa_normalized_variance(4, rng)
    large, n_large = spsa_normalized_variance(39, rng)
    assert small == pytest.approx(n_small - 1, rel=0.25)
    assert large == pytest.approx(n_large - 1, rel=0.25)
    assert large > 5 * small


def test_mgd_time_code_equals_forward_differences(rng):
    network = digital_network([3, 4, 2], seed=2)
    x = rng.uniform(-1, 1, (10, 3))
    labels = rng.integers(0, 2, 10)
    ctx = context(2)
    step = 1e-4
    rule = MGD(code="time", perturbation=step)
    rule.setup(network, ctx)
    estimate = rule.compute(network, x, labels, ctx).gradients

    baseline = ctx.loss(network.forward(x), labels)[0]
    for i in network.trainable_indices:
        node = network[i]
        for name, base in node.get_parameters().items():
            expected = np.zeros_like(base)
            for k in range(base.size):
                trial = base.copy()
                trial.flat[k] += step
                applied = node.set_parameters({name: trial})[name].flat[k] - base.flat[k]
                expected.flat[k] = (ctx.loss(network.forward(x), labels)[0] - baseline) / applied
            node.set_parameters({name: base})
            np.testing.assert_allclose(estimate[i][name], expected, rtol=1e-9, atol=1e-12)


def test_mgd_time_code_sweeps_over_windows(rng):
    network = digital_network([3, 2], seed=2)
    x = rng.uniform(-1, 1, (10, 3))
    labels = rng.integers(0, 2, 10)
    ctx = context(2)
    rule = MGD(code="time", perturbation=1e-4, window=3)
    rule.setup(network, ctx)
    first = rule.compute(network, x, labels, ctx).gradients[0]
    second = rule.compute(network, x, labels, ctx).gradients[0]
    # Three parameters per window, in order: weight[0, 0..2], then weight[1, 0..2].
    assert np.count_nonzero(first["weight"][0]) == 3
    assert not np.any(first["weight"][1])
    assert np.count_nonzero(second["weight"][1]) == 3
    assert not np.any(second["weight"][0])
    assert rule.state_dict() == {"next_slot": 6}


def test_mgd_sign_code_mean_aligns(rng):
    network = digital_network([4, 6, 3], seed=4)
    x = rng.uniform(-1, 1, (32, 4))
    labels = rng.integers(0, 3, 32)
    ctx = context(3)
    rule = MGD(perturbation=1e-3, window=3000)
    rule.setup(network, ctx)
    estimate = flat(rule.compute(network, x, labels, ctx).gradients)
    truth = flat(backprop_gradients(network, x, labels, ctx.loss))
    assert cosine(estimate, truth) > 0.98


def test_wp_matches_finite_differences_in_expectation(rng):
    network = digital_network([3, 4, 2], seed=5)
    x = rng.uniform(-1, 1, (20, 3))
    labels = rng.integers(0, 2, 20)
    ctx = context(2)
    reference = flat(central_differences(network, x, labels, ctx.loss))
    rule = WeightPerturbation(perturbation=1e-4, directions=3000)
    rule.setup(network, ctx)
    estimate = flat(rule.compute(network, x, labels, ctx).gradients)
    assert cosine(estimate, reference) > 0.99
    assert np.linalg.norm(estimate) == pytest.approx(np.linalg.norm(reference), rel=0.05)


def test_np_correlates_with_backprop(rng):
    network = digital_network([4, 8, 8, 3], seed=6)
    x, labels = blobs(rng, 256)
    ctx = context(3)
    rule = NodePerturbation(perturbation=1e-3, directions=100)
    rule.setup(network, ctx)
    estimate = rule.compute(network, x, labels, ctx).gradients
    truth = backprop_gradients(network, x, labels, ctx.loss)
    for i in network.trainable_indices:
        assert cosine(estimate[i]["weight"].ravel(), truth[i]["weight"].ravel()) > 0.9, network[i].name


def test_per_example_losses_average_to_loss(rng):
    outputs = rng.normal(size=(6, 4))
    labels = rng.integers(0, 4, 6)
    for name in ("cross_entropy", "mse"):
        loss = get_loss(name)
        values = per_example_losses(loss, outputs, labels)
        assert values.shape == (6,)
        assert values.mean() == pytest.approx(loss(outputs, labels)[0], rel=1e-12)
        assert values[2] == pytest.approx(loss(outputs[2:3], labels[2:3])[0], rel=1e-12)


def test_spsa_gain_sequences():
    rule = SPSA(stability=10.0)
    assert rule.gains(0) == (1.0, 1.0)
    gain, shrink = rule.gains(40)
    assert gain == pytest.approx((11.0 / 51.0) ** 0.602)
    assert shrink == pytest.approx(41.0**-0.101)


# ------------------------------------------------------------------------------- restoring
PERTURBING_RULES = [
    lambda: WeightPerturbation(directions=3),
    lambda: SPSA(directions=2),
    lambda: MGD(window=4),
    lambda: MGD(code="time", window=5, slot_size=2),
]


@pytest.mark.parametrize("make", PERTURBING_RULES)
def test_digital_parameters_restored_bit_for_bit(make, rng):
    network = digital_network([4, 6, 3], dtype=np.float32)
    before = {i: {k: getattr(network[i], k).tobytes() for k in ("weight", "bias")} for i in network.trainable_indices}
    ctx = context(3)
    rule = make()
    rule.setup(network, ctx)
    rule.compute(network, rng.uniform(-1, 1, (8, 4)), rng.integers(0, 3, 8), ctx)
    for i, arrays in before.items():
        for name, raw in arrays.items():
            assert getattr(network[i], name).tobytes() == raw, f"{network[i].name} {name}"


@pytest.mark.parametrize("make", PERTURBING_RULES)
def test_crossbar_parameters_restored(make, rng):
    nodes = [CrossbarNode(4, 6, rng=1, name="h"), CrossbarNode(6, 3, rng=2, name="out", activation="linear")]
    network = PhysicalNetwork([*nodes, Readout(3)])
    # Leave something in the update buffers: perturbing must not discard pending updates.
    nodes[0].apply_update({"weight": np.full((6, 4), 0.4 * nodes[0].parameters["weight"].resolution)})
    weights = [node.get_parameters() for node in nodes]
    conductances = [node.conductances() for node in nodes]
    buffers = [node.update_buffers() for node in nodes]
    ctx = context(3)
    rule = make()
    rule.setup(network, ctx)
    rule.compute(network, rng.uniform(-1, 1, (8, 4)), rng.integers(0, 3, 8), ctx)
    for node, w, g, buffer in zip(nodes, weights, conductances, buffers):
        for name, value in node.get_parameters().items():
            resolution = node.parameters[name].resolution
            np.testing.assert_allclose(value, w[name], rtol=0, atol=0.5 * resolution)
            np.testing.assert_allclose(node.conductances()[name][0], g[name][0], rtol=0, atol=1e-12)
            np.testing.assert_array_equal(node.update_buffers()[name], buffer[name])


class FailingLinear(DigitalLinear):
    """A digital layer whose n-th forward pass returns NaN, like an overrange reading."""

    def __init__(self, *args, fail_on: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail_on = fail_on
        self.calls = 0

    def _forward(self, x):
        self.calls += 1
        outputs, applied, probes = super()._forward(x)
        if self.calls == self.fail_on:
            outputs = np.full_like(outputs, np.nan)
        return outputs, applied, probes


@pytest.mark.parametrize("make", PERTURBING_RULES)
def test_failed_measurement_restores_parameters(make, rng):
    node = FailingLinear(4, 3, activation="linear", rng=0, name="fc", fail_on=3)
    # No readout after it: a readout would reject the NaN inputs before the rule receives them.
    network = PhysicalNetwork([node])
    before = node.weight.tobytes()
    ctx = context(3)
    rule = make()
    rule.setup(network, ctx)
    with pytest.raises(MeasurementError, match="'fc'"):
        rule.compute(network, rng.uniform(-1, 1, (8, 4)), rng.integers(0, 3, 8), ctx)
    assert node.weight.tobytes() == before


def test_crossbar_keeps_update_buffer_when_set():
    node = CrossbarNode(4, 2, rng=0, init_scale=0.0)
    step = node.parameters["weight"].resolution
    node.apply_update({"weight": np.full((2, 4), 0.6 * step)})
    node.set_parameters(node.get_parameters())
    applied = node.apply_update({"weight": np.full((2, 4), 0.6 * step)})["weight"]
    np.testing.assert_allclose(applied, step, rtol=1e-9)


# ------------------------------------------------------------------------------- network hook
def test_forward_adds_perturbation_to_outputs(rng):
    network = digital_network([3, 4, 2], seed=1)
    x = rng.uniform(-1, 1, (5, 3))
    clean = network.forward(x)
    hidden = network.states[0].outputs.copy()
    noise = rng.normal(0, 0.01, (5, 4))
    perturbed = network.forward(x, perturbations={0: noise})
    np.testing.assert_array_equal(network.states[0].outputs, hidden)
    np.testing.assert_allclose(network.states[1].inputs, hidden + noise, rtol=1e-12)
    np.testing.assert_allclose(network.applied_perturbations[0], noise, rtol=1e-12)
    assert not np.allclose(perturbed, clean)
    network.forward(x)
    assert network.applied_perturbations == {}


def test_forward_clips_perturbation_into_next_input_range(rng):
    nodes = [CrossbarNode(3, 4, rng=1, name="h"), CrossbarNode(4, 2, rng=2, name="out", activation="linear")]
    network = PhysicalNetwork([*nodes, Readout(2)])
    x = rng.uniform(-1, 1, (5, 3))
    network.forward(x, perturbations={0: np.full(4, 3.0)})
    applied = network.applied_perturbations[0]
    assert applied.shape == (5, 4)
    np.testing.assert_allclose(network.states[0].outputs + applied, 1.0, rtol=1e-6)


def test_forward_rejects_bad_perturbation(rng):
    network = digital_network([3, 4, 2])
    x = rng.uniform(-1, 1, (5, 3))
    with pytest.raises(ConfigError, match="positions run from 0 to 2"):
        network.forward(x, perturbations={7: np.zeros(4)})
    with pytest.raises(ConfigError, match=r"node 'fc0' has shape \(5, 3\); expected \(5, 4\)"):
        network.forward(x, perturbations={0: np.zeros((5, 3))})
    with pytest.raises(ConfigError, match="NaN"):
        network.forward(x, perturbations={0: np.full(4, np.nan)})


# ------------------------------------------------------------------------------- bad input
def crossbar_network():
    nodes = [CrossbarNode(4, 6, rng=1, name="h"), CrossbarNode(6, 3, rng=2, name="out", activation="linear")]
    return PhysicalNetwork([*nodes, Readout(3)])


def test_perturbation_below_resolution_rejected():
    network = crossbar_network()
    resolution = network[0].parameters["weight"].resolution
    for name in ("wp", "spsa", "mgd"):
        rule = make_rule(name, perturbation=resolution / 4)
        with pytest.raises(ConfigError, match=f"smaller than the resolution {resolution:g} of node 'h' parameter 'weight'"):
            rule.check(network)


def test_perturbation_off_the_grid_warns(caplog):
    network = crossbar_network()
    resolution = network[0].parameters["weight"].resolution
    with caplog.at_level(logging.WARNING, logger="pnn.learning.perturbation"):
        WeightPerturbation(perturbation=1.5 * resolution).check(network)
    assert "not a whole number of resolution steps" in caplog.text
    assert "'h' parameter 'weight'" in caplog.text


def test_perturbation_wider_than_range_rejected():
    network = crossbar_network()
    # The biases span [-1, 1]; the first layer's weights span [-4, 4].
    with pytest.raises(ConfigError, match=r"more than half the range \[-1, 1\] of node 'h' parameter 'bias'"):
        SPSA(perturbation=1.5).check(network)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("wp", {"perturbation": 0.0}, "perturbation must be a positive number"),
        ("wp", {"perturbation": -1e-3}, "perturbation must be a positive number"),
        ("spsa", {"perturbation": float("nan")}, "perturbation must be a positive number"),
        ("mgd", {"perturbation": "big"}, "perturbation must be a positive number"),
        ("np", {"perturbation": 0}, "perturbation must be a positive number"),
        ("wp", {"directions": 0}, "directions must be a positive integer"),
        ("wp", {"perturbation_steps": 0}, "perturbation_steps must be a positive integer"),
        ("np", {"directions": 1.5}, "directions must be a positive integer"),
        ("spsa", {"alpha": -0.1}, "alpha must be a number >= 0"),
        ("mgd", {"code": "sine"}, "unknown code 'sine'; choose one of sign, time"),
        ("mgd", {"window": 0}, "window must be a positive integer"),
        ("mgd", {"slot_size": 4}, "slot_size applies to the time code only"),
        ("wp", {"step": 1e-3}, "invalid option"),
    ],
)
def test_bad_options(name, options, message):
    with pytest.raises(ConfigError, match=message):
        make_rule(name, **options)


class ModelFreeLinear(DigitalLinear):
    """A trainable node that offers no local gradient, like an instrument without a model."""

    gradient_method = "none"


def test_np_needs_local_gradient():
    network = PhysicalNetwork([ModelFreeLinear(3, 2, rng=0, name="black-box"), Readout(2)])
    with pytest.raises(ConfigError, match="node 'black-box' .* no local gradient.*use wp, spsa or mgd"):
        NodePerturbation().check(network)
    # The parameter-perturbing rules need only forward passes, so they accept it.
    for name in ("wp", "spsa", "mgd"):
        make_rule(name).check(network)


def test_rules_need_a_trainable_node():
    network = PhysicalNetwork([Readout(3)])
    for name in ("wp", "np", "spsa", "mgd"):
        with pytest.raises(ConfigError, match="no trainable node"):
            make_rule(name).check(network)


# ------------------------------------------------------------------------------- learning
def blobs(rng, n=150):
    x = rng.uniform(-1, 1, (n, 4))
    labels = np.argmax(x[:, :3] + 0.3 * x[:, 3:4], axis=1)
    return x, labels


@pytest.mark.parametrize(
    ("rule", "epochs"),
    [
        (WeightPerturbation(), 30),
        (SPSA(), 30),
        (MGD(window=8), 30),
        (MGD(code="time"), 10),
        (NodePerturbation(), 30),
    ],
    ids=["wp", "spsa", "mgd-sign", "mgd-time", "np"],
)
def test_rule_learns_small_task(rule, epochs, rng):
    x, labels = blobs(rng)
    network = digital_network([4, 8, 3], seed=7)
    controller = PhysicalNoProp(network, rule, lr=0.03, epochs=epochs, batch_size=30, progress=False)
    controller.fit(x, labels)
    history = controller.history_
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert controller.evaluate(x, labels)["accuracy"] > 0.85


@pytest.mark.parametrize("device", ["digital", "crossbar"])
@pytest.mark.parametrize("name", ["wp", "np", "spsa", "mgd"])
def test_vowels_short_run(name, device, tmp_path):
    config = TrainConfig(rule=name, device=device, epochs=8, hidden=[16], lr=0.01, seed=1, out=str(tmp_path / "run"))
    summary = train(config, progress=False)
    assert summary["steps"] == 8 * 27
    assert summary["rejected_batches"] == 0
    # Eight epochs are short for a perturbative rule: these runs measured 0.45 to 0.86, chance is 1/7.
    assert summary["test_accuracy"] > 0.4


@pytest.mark.parametrize(("name", "options"), [("spsa", {}), ("mgd", {"code": "time", "window": 50})])
def test_resume_restores_rule_state(name, options, tmp_path):
    config = dict(rule=name, rule_options=options, device="digital", epochs=2, hidden=[8], seed=2)
    reference = train(TrainConfig(out=str(tmp_path / "full"), **config), progress=False)

    class StopAfterFirstEpoch(Exception):
        pass

    def stop(controller, record):
        raise StopAfterFirstEpoch

    with pytest.raises(StopAfterFirstEpoch):
        train(TrainConfig(out=str(tmp_path / "split"), **config), progress=False, callbacks=[stop])
    resumed = train(resume=tmp_path / "split", progress=False)
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-12)
