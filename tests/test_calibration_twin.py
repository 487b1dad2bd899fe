"""Digital twins: predictions, exact gradients of the fitted model, and physics-aware training."""

from __future__ import annotations

import numpy as np
import pytest

from pnn.calibration import (
    CalibratedNode,
    Calibrator,
    CalibrationStore,
    ChannelReference,
    DigitalTwin,
    LinearReference,
    Sweep,
    TwinGradientNode,
    reference_for,
)
from pnn.controller import PhysicalNoProp
from pnn.datasets import load_dataset
from pnn.errors import ConfigError
from pnn.learning import make_rule
from pnn.network import Encoder, PhysicalNetwork, Readout
from pnn.simulators import CROSSBAR_PRESETS, CrossbarNode

from .calibration_nodes import TransferNode


@pytest.fixture(scope="module")
def calibrated():
    node = CrossbarNode(5, 3, rng=3, name="xbar", init_scale=2.5)
    sweep = Sweep(points=80, repeats=2, parameters={"bias": (-1.0, 1.0)}, parameter_points=3)
    return node, Calibrator(sweep=sweep).fit(node, progress=False)


def test_twin_from_record_matches_calibrator(calibrated, tmp_path):
    node, calibrator = calibrated
    store = CalibrationStore(tmp_path)
    store.append(calibrator.record_)
    twin = store.latest(node).twin(node)
    x = np.random.default_rng(0).uniform(-1, 1, (10, 5))
    np.testing.assert_allclose(twin.predict(x), calibrator.twin_.predict(x))
    assert twin.record_hash == calibrator.record_.content_hash
    assert twin.identity()["record"] == calibrator.record_.content_hash


def test_twin_predicts_new_measurements(calibrated):
    node, calibrator = calibrated
    twin = calibrator.twin_
    twin.sync(node)
    x = np.random.default_rng(1).uniform(-1, 1, (200, 5))
    measured = np.mean([node.forward(x) for _ in range(4)], axis=0)
    error = np.sqrt(np.mean((measured - twin.predict(x)) ** 2, axis=0))
    # Read noise of the mean of 4 readings is about 0.08 / 2 before tanh; the twin adds little.
    assert np.all(error < 0.05)
    # Held-out error was recorded with the calibration, of the same size.
    assert np.all(np.array(calibrator.holdout_error_["rms"]) < 0.08)


def finite_difference(function, value: np.ndarray, step: float = 1e-6) -> np.ndarray:
    gradient = np.zeros_like(value)
    for index in np.ndindex(value.shape):
        up, down = value.copy(), value.copy()
        up[index] += step
        down[index] -= step
        gradient[index] = (function(up) - function(down)) / (2 * step)
    return gradient


def test_twin_gradients_match_finite_differences(calibrated):
    _, calibrator = calibrated
    twin = calibrator.twin_
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (6, 5))
    error = rng.normal(size=(6, 3))
    twin.forward(x)
    state = twin.measure_state()
    params = twin.get_parameters()

    # Loss L = sum(error * y) / batch, whose gradient at the outputs is error / batch per example.
    def loss(inputs=x, weight=params["weight"], bias=params["bias"]):
        return float(np.sum(error * twin.predict(inputs, {"weight": weight, "bias": bias})))

    input_gradient = twin.input_gradient(state, error)
    np.testing.assert_allclose(input_gradient, finite_difference(lambda v: loss(inputs=v), x), rtol=1e-5, atol=1e-8)
    gradients = twin.local_gradient(state, error)
    np.testing.assert_allclose(gradients["weight"] * 6, finite_difference(lambda v: loss(weight=v), params["weight"]),
                               rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gradients["bias"] * 6, finite_difference(lambda v: loss(bias=v), params["bias"]),
                               rtol=1e-5, atol=1e-8)


def test_twin_error_at_preactivation(calibrated):
    _, calibrator = calibrated
    twin = calibrator.twin_
    x = np.random.default_rng(3).uniform(-1, 1, (4, 5))
    twin.forward(x)
    state = twin.measure_state()
    delta = np.ones((4, 3))
    gradients = twin.local_gradient(state, delta, at="preactivation")
    np.testing.assert_allclose(gradients["weight"], delta.T @ x / 4)


def test_channel_twin_without_node():
    node = TransferNode("cos2", np.array([[1.0, 1.2, 0.5, 0.1], [0.5, 0.9, -0.5, 0.0]]), noise_std=0.005, seed=4)
    calibrator = Calibrator("cos2", sweep=Sweep(points=120, repeats=2)).fit(node, progress=False)
    twin = DigitalTwin.from_record(calibrator.record_)
    assert isinstance(twin.reference, ChannelReference)
    x = np.random.default_rng(5).uniform(-1, 1, (50, 2))
    truth = node.model.function(x, *node.truth.T)
    np.testing.assert_allclose(twin.predict(x), truth, atol=0.01)


def test_reference_choice():
    crossbar = CrossbarNode(4, 3, rng=0, name="xbar")
    assert isinstance(reference_for(crossbar), LinearReference)
    square = TransferNode("linear", np.array([[1.0, 0.0]] * 3))
    assert isinstance(reference_for(square), ChannelReference)
    assert reference_for(crossbar, "channel:0,0,3").mapping == (0, 0, 3)
    with pytest.raises(ConfigError, match="4 inputs and 3 outputs"):
        reference_for(crossbar, "channel")
    with pytest.raises(ConfigError, match=r"input channel\(s\) \[7\]"):
        reference_for(crossbar, "channel:0,1,7")
    with pytest.raises(ConfigError, match="has no parameter 'weight'"):
        reference_for(square, "linear")


def test_twin_gradient_node_uses_the_twin(calibrated):
    node, calibrator = calibrated
    wrapped = TwinGradientNode(node, calibrator.twin_)
    assert wrapped.has_input_gradient
    assert wrapped.gradient_method == "adjoint"
    x = np.random.default_rng(6).uniform(-1, 1, (8, 5))
    outputs = wrapped.forward(x)
    state = wrapped.measure_state()
    np.testing.assert_array_equal(outputs, node.measure_state().outputs)
    error = np.random.default_rng(7).normal(size=(8, 3))
    twin = calibrator.twin_
    twin.sync(node)
    twin.forward(state.inputs)
    expected = twin.local_gradient(twin.measure_state(), error)
    got = wrapped.local_gradient(state, error)
    np.testing.assert_allclose(got["weight"], expected["weight"], rtol=1e-10)
    np.testing.assert_allclose(wrapped.input_gradient(state, error), twin.input_gradient(twin.measure_state(), error), rtol=1e-10)


def test_calibrated_node_corrects_readings():
    node = TransferNode("linear", np.array([[2.0, 0.5], [0.5, -1.0]]), noise_std=0.0)
    corrected = CalibratedNode(node, gain=[2.0, 0.5], offset=[0.5, -1.0])
    x = np.array([[0.2, -0.4], [0.9, 0.1]])
    np.testing.assert_allclose(corrected.forward(x), x)
    np.testing.assert_allclose(corrected.uncorrect(corrected.correct(x)), x)
    with pytest.raises(ConfigError, match="non-zero gains"):
        corrected.set_correction([1.0, 0.0], 0.0)


def test_vowels_train_through_a_twin_gradient_stage():
    # A physical stage with no model of its own (a saturating amplifier per channel) sits
    # between the last trainable layer and the readout. DFA needs an input gradient there;
    # the calibrated twin provides it.
    data = load_dataset("vowels")
    amplifier = TransferNode("tanh", np.array([[1.0, 0.5, 0.0, 0.0]] * 7), noise_std=0.01, lower=-8.0, upper=8.0,
                             seed=8, name="amplifier")
    layer1 = CrossbarNode(12, 32, rng=1, name="layer1")
    layer2 = CrossbarNode(32, 7, rng=2, name="layer2", activation="linear")
    encoder = Encoder(12, method="standard").fit(data.x_train)
    plain = PhysicalNetwork([encoder, layer1, layer2, amplifier, Readout(7, gain=4.0)])
    with pytest.raises(ConfigError, match="'amplifier' after the last trainable node has no model"):
        make_rule("dfa").check(plain)

    twin = Calibrator("tanh", sweep=Sweep(points=100, repeats=2)).fit(amplifier, progress=False).twin_
    network = PhysicalNetwork([encoder, layer1, layer2, TwinGradientNode(amplifier, twin), Readout(7, gain=4.0)])
    controller = PhysicalNoProp(network, make_rule("dfa"), lr=3e-3, epochs=30, batch_size=8, seed=0, progress=False)
    controller.fit(data.x_train, data.y_train, n_classes=7)
    # Seeds 0 to 2 reach 0.88 to 0.90; chance is 1/7.
    assert controller.evaluate(data.x_test, data.y_test)["accuracy"] > 0.8
