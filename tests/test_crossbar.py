"""The crossbar simulator against a slow NumPy reference, stage by stage."""

from __future__ import annotations

import numpy as np
import pytest

from pnn.errors import ConfigError
from pnn.network import DigitalLinear
from pnn.simulators.crossbar import CROSSBAR_PRESETS, STAGES, CrossbarConfig, CrossbarNode, crossbar_preset

IDEAL = CROSSBAR_PRESETS["ideal"]


def reference_forward(node: CrossbarNode, x: np.ndarray, noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Slow NumPy model of one forward pass: returns (pre-activation, output), float64."""
    cfg = node.config
    x = np.asarray(x, dtype=np.float64)
    if cfg.enabled("dac"):
        steps = 2 ** (cfg.dac_bits - 1) - 1
        x = np.round(x * steps) / steps
    params = node.get_parameters()
    a = x @ params["weight"].T + params["bias"]
    if noise is not None:
        a = a + noise
    fs = node.full_scale
    if cfg.enabled("saturation"):
        a = np.clip(a, -fs, fs)
    if cfg.enabled("adc"):
        steps = 2 ** (cfg.adc_bits - 1) - 1
        a = np.round(a / fs * steps) / steps * fs
    return a, node.activation.f(a)


def only(stage: str) -> CrossbarConfig:
    return CrossbarConfig().without(*(s for s in STAGES if s != stage))


@pytest.fixture
def x(rng):
    return rng.uniform(-1, 1, (32, 20))


def test_ideal_is_exact_linear_layer(x):
    node = CrossbarNode(20, 8, config=IDEAL, rng=5)
    y = node.forward(x)
    a_ref, y_ref = reference_forward(node, x)
    np.testing.assert_allclose(node.measure_state().probes["preactivation"], a_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, np.tanh(x @ node.get_parameters()["weight"].T + node.get_parameters()["bias"]), atol=1e-5)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)


@pytest.mark.parametrize("stage", ["dac", "saturation", "adc", "conductance_levels"])
def test_each_deterministic_stage_alone(stage, x):
    node = CrossbarNode(20, 8, config=only(stage), rng=5, activation="linear", init_scale=6.0)
    y = node.forward(x)
    a_ref, y_ref = reference_forward(node, x)
    # One quantization step of slack where float32 rounding can land on the other side.
    tol = 1e-4 if stage in ("dac", "conductance_levels") else node.full_scale / 127 + 1e-4
    assert np.max(np.abs(y - y_ref)) <= tol
    assert np.mean(np.abs(y - y_ref) < 1e-4) > 0.95


def test_saturation_clips_at_full_scale(x):
    node = CrossbarNode(20, 8, config=only("saturation"), rng=5, activation="linear", init_scale=40.0)
    node.forward(x)
    a = node.measure_state().probes["preactivation"]
    assert np.max(np.abs(a)) == pytest.approx(node.full_scale)
    assert np.count_nonzero(np.isclose(np.abs(a), node.full_scale)) > 1


def test_levels_put_weights_on_grid():
    node = CrossbarNode(20, 8, config=only("conductance_levels"), rng=5)
    spec = node.parameters["weight"]
    w = node.get_parameters()["weight"]
    levels = (w - spec.lower_array) / spec.resolution
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-6)
    assert spec.resolution == pytest.approx(node.w_max / (node.config.levels - 1))


def test_read_noise_mean_and_spread(rng):
    cfg = only("read_noise")
    node = CrossbarNode(10, 4, config=cfg, rng=11, activation="linear")
    x = np.tile(rng.uniform(-1, 1, (1, 10)), (4000, 1))
    y = node.forward(x)
    a_clean, _ = reference_forward(node, x[:1])
    sigma = cfg.read_noise_std * node.full_scale
    mean_error = y.mean(axis=0) - a_clean[0]
    # The mean of 4000 samples has standard error sigma / sqrt(4000); allow 5 of them.
    assert np.all(np.abs(mean_error) < 5 * sigma / np.sqrt(4000))
    spread = y.std(axis=0, ddof=1)
    # The sample standard deviation of 4000 Gaussian draws is within 6 % of sigma at > 5 sigma.
    np.testing.assert_allclose(spread, sigma, rtol=0.06)


def test_same_seed_is_bit_identical(x):
    a = CrossbarNode(20, 8, rng=42).forward(x)
    b = CrossbarNode(20, 8, rng=42).forward(x)
    c = CrossbarNode(20, 8, rng=43).forward(x)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def reference_accumulate(weights, buffer, delta, step, w_max):
    """Slow model of the update buffer: add, program whole levels, keep the rest."""
    buffer = buffer + delta
    pulses = np.trunc(buffer / step)
    buffer = buffer - pulses * step
    target = np.clip(weights + pulses * step, -w_max, w_max)
    return np.round(target / step) * step, buffer


def test_accumulate_matches_reference(rng):
    node = CrossbarNode(12, 6, config=only("conductance_levels"), rng=3)
    spec = node.parameters["weight"]
    weights = node.get_parameters()["weight"]
    buffer = np.zeros_like(weights)
    for _ in range(40):
        delta = rng.normal(0, 0.4 * spec.resolution, spec.shape)
        node.apply_update({"weight": delta}, clip=True)
        weights, buffer = reference_accumulate(weights, buffer, delta, spec.resolution, node.w_max)
        np.testing.assert_allclose(node.get_parameters()["weight"], weights, atol=1e-9)
    assert np.any(weights != 0)


def test_stochastic_rounding_is_unbiased():
    cfg = only("conductance_levels").replace(update_mode="stochastic")
    node = CrossbarNode(50, 40, config=cfg, rng=3, init_scale=0.0)
    step = node.parameters["weight"].resolution
    node.apply_update({"weight": np.full((40, 50), 0.3 * step)})
    programmed = node.get_parameters()["weight"] / step
    # Each element moves one level with probability 0.3.
    assert set(np.unique(np.round(programmed))) <= {0.0, 1.0}
    assert programmed.mean() == pytest.approx(0.3, abs=0.05)


def test_small_updates_accumulate_until_a_level():
    node = CrossbarNode(4, 2, config=only("conductance_levels"), rng=0, init_scale=0.0)
    step = node.parameters["weight"].resolution
    applied = [node.apply_update({"weight": np.full((2, 4), 0.3 * step)})["weight"] for _ in range(4)]
    totals = [float(a[0, 0]) / step for a in applied]
    np.testing.assert_allclose(totals, [0.0, 0.0, 0.0, 1.0], atol=1e-9)


def test_conductances_stay_in_device_range(rng):
    node = CrossbarNode(8, 4, rng=1)
    for _ in range(30):
        node.apply_update({"weight": rng.normal(0, 0.2, (4, 8))}, clip=True)
    for g_plus, g_minus in node.conductances().values():
        for g in (g_plus, g_minus):
            assert np.all(g >= node.config.g_min - 1e-12)
            assert np.all(g <= node.config.g_max + 1e-12)
        # One device of each pair stays at g_min.
        np.testing.assert_allclose(np.minimum(g_plus, g_minus), node.config.g_min)


def test_ideal_gradient_equals_digital(x, rng):
    node = CrossbarNode(20, 8, config=IDEAL, rng=5)
    digital = DigitalLinear(20, 8, rng=0, dtype=np.float64)
    digital.set_parameters(node.get_parameters())
    node.forward(x)
    digital.forward(x)
    error = rng.normal(size=(32, 8))
    g_node = node.local_gradient(node.measure_state(), error)
    g_digital = digital.local_gradient(digital.measure_state(), error)
    for name in g_node:
        np.testing.assert_allclose(g_node[name], g_digital[name], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        node.input_gradient(node.measure_state(), error),
        digital.input_gradient(digital.measure_state(), error), rtol=1e-4, atol=1e-6,
    )


def test_saturated_outputs_carry_no_gradient(x):
    node = CrossbarNode(20, 8, config=only("saturation"), rng=5, activation="linear", init_scale=40.0)
    node.forward(x)
    state = node.measure_state()
    saturated = np.abs(state.probes["preactivation"]) >= node.full_scale * (1 - 1e-6)
    assert saturated.any() and not saturated.all()
    error = np.where(saturated, 1.0, 0.0)
    grads = node.local_gradient(state, error)
    np.testing.assert_array_equal(grads["weight"], 0.0)


def test_bad_settings_raise():
    with pytest.raises(ConfigError, match="unknown crossbar stage"):
        CrossbarConfig().without("no_such_stage")
    with pytest.raises(ConfigError, match="g_min < g_max"):
        CrossbarConfig(g_min=5.0, g_max=1.0)
    with pytest.raises(ConfigError, match="unknown crossbar setting"):
        CrossbarConfig().replace(read_noise=0.1)
    with pytest.raises(ConfigError, match="unknown crossbar preset 'fast'"):
        crossbar_preset("fast")
    with pytest.raises(ConfigError, match="unknown crossbar activation"):
        CrossbarNode(3, 2, activation="relu")
    with pytest.raises(ConfigError, match="update_mode"):
        CrossbarConfig(update_mode="round")
