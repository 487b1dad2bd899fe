"""Fits recover known transfer curves from simulated nodes within their reported uncertainties."""

from __future__ import annotations

import numpy as np
import pytest

from pnn.calibration import Calibrator, OutputDrift, Sweep, fit_channel, fit_transfer, get_model
from pnn.errors import CalibrationError, ConfigError
from pnn.simulators import CROSSBAR_PRESETS, STAGES, CrossbarNode

from .calibration_nodes import TransferNode

# A fitted value may lie 4 standard uncertainties from the truth. With about 20 parameters per
# test, a 3-sigma miss happens in a few percent of runs by chance, a 4-sigma one almost never.
SIGMAS = 4.0


def assert_within_uncertainty(fit, truth: dict[str, float]) -> None:
    for name, true_value in truth.items():
        value, sigma = fit.parameters[name], fit.uncertainties[name]
        assert sigma > 0, f"channel {fit.channel} {name}: zero uncertainty"
        assert abs(value - true_value) <= SIGMAS * sigma, (
            f"channel {fit.channel} {name}: fitted {value:.5g} +- {sigma:.2g}, true {true_value:.5g}"
        )


def read_noise_only():
    """The default crossbar with every imperfection off except read noise."""
    return CROSSBAR_PRESETS["default"].without(*(stage for stage in STAGES if stage != "read_noise"))


def test_gain_offset_of_drifted_readout():
    # A linear crossbar behind a read-out chain whose gain and offset have drifted to known values.
    crossbar = CrossbarNode(6, 4, activation="linear", config=read_noise_only(), rng=1, name="out", init_scale=4.0)
    gain_rate = np.array([-2e-3, 1e-3, -5e-4, 3e-3])
    offset_rate = np.array([1e-3, -2e-3, 4e-3, 0.0])
    node = OutputDrift(crossbar, gain_rate=gain_rate, offset_rate=offset_rate, t_per_batch=0.0)
    node.advance_time(100.0)
    calibrator = Calibrator("linear", sweep=Sweep(points=200, repeats=3)).fit(node, progress=False)
    for k, channel in enumerate(calibrator.fit_.channels):
        assert_within_uncertainty(channel, {"gain": 1 + 100 * gain_rate[k], "offset": 100 * offset_rate[k]})


def test_noise_level_from_repeats():
    node = CrossbarNode(6, 4, activation="linear", config=read_noise_only(), rng=1, name="out")
    calibrator = Calibrator("linear", sweep=Sweep(points=150, repeats=4)).fit(node, progress=False)
    # Read noise: read_noise_std times the output layer's ADC full scale.
    expected = read_noise_only().read_noise_std * node.full_scale
    for channel in calibrator.fit_.channels:
        assert channel.noise_std == pytest.approx(expected, rel=0.1)
    # A model that explains everything but the noise: reduced chi-square near 1. One channel's
    # value scatters by about 0.15 (120 points), the mean of four by about 0.08.
    assert np.mean([channel.reduced_chi2 for channel in calibrator.fit_.channels]) == pytest.approx(1.0, abs=0.25)
    noise = calibrator.sweep_result_.noise_std()
    np.testing.assert_allclose(noise, expected, rtol=0.1)


def test_tanh_curve_of_default_crossbar():
    # The periphery applies tanh to the pre-activation W x + b: amplitude 1, gain 1, no shift or offset.
    node = CrossbarNode(6, 4, rng=2, name="hidden", init_scale=3.0)
    sweep = Sweep(points=120, repeats=3, parameters={"bias": (-1.0, 1.0)}, parameter_points=3)
    calibrator = Calibrator(sweep=sweep).fit(node, progress=False)
    assert calibrator.model_.name == "tanh"
    for channel in calibrator.fit_.channels:
        assert_within_uncertainty(channel, {"amplitude": 1.0, "gain": 1.0, "shift": 0.0, "offset": 0.0})
        assert channel.r_squared > 0.99


def test_sigmoid_curve_of_crossbar():
    node = CrossbarNode(6, 3, activation="sigmoid", config=read_noise_only(), rng=4, name="sig", init_scale=4.0)
    sweep = Sweep(points=150, repeats=3, parameters={"bias": (-1.0, 1.0)}, parameter_points=3)
    calibrator = Calibrator(sweep=sweep).fit(node, progress=False)
    assert calibrator.model_.name == "sigmoid"
    for channel in calibrator.fit_.channels:
        assert_within_uncertainty(channel, {"amplitude": 1.0, "gain": 1.0, "shift": 0.0, "offset": 0.0})


@pytest.mark.parametrize(
    ("model", "truth"),
    [
        ("poly3", [[0.05, 0.9, 0.2, -0.3], [-0.1, 1.2, -0.1, 0.25], [0.0, 0.7, 0.05, 0.1]]),
        ("tanh", [[1.2, 1.5, 0.3, 0.1], [0.8, 2.5, -0.2, -0.05], [1.0, 1.0, 0.0, 0.0]]),
        # Interferometers: amplitude (mW), V_pi (V), bias phase (rad), dark level (mW).
        ("cos2", [[1.5, 1.2, 0.4, 0.02], [0.9, 0.8, -1.0, 0.05], [2.0, 1.5, 2.0, 0.0]]),
    ],
)
def test_transfer_node_curves(model, truth):
    truth = np.array(truth)
    node = TransferNode(model, truth, noise_std=0.01, lower=-2.0, upper=2.0, seed=5)
    calibrator = Calibrator(model, sweep=Sweep(points=160, repeats=3)).fit(node, progress=False)
    names = get_model(model).parameter_names
    for k, channel in enumerate(calibrator.fit_.channels):
        assert_within_uncertainty(channel, dict(zip(names, truth[k])))


def test_grid_sweep_fits_the_same_curve():
    truth = np.array([[1.0, 1.3, 0.0, 0.1], [0.5, 2.0, 0.2, -0.2]])
    node = TransferNode("tanh", truth, noise_std=0.01, lower=-2.0, upper=2.0, seed=6)
    calibrator = Calibrator("tanh", sweep=Sweep(design="grid", points=101, repeats=3)).fit(node, progress=False)
    for k, channel in enumerate(calibrator.fit_.channels):
        assert_within_uncertainty(channel, dict(zip(get_model("tanh").parameter_names, truth[k])))


def test_outliers_are_rejected():
    truth = np.array([[1.5, 0.5]])
    node = TransferNode("linear", truth, noise_std=0.01, seed=7)
    sweep = Sweep(points=100, repeats=1, shuffle=False, batch_size=100)
    result = sweep.run(node, progress=False)
    result.outputs[[3, 40, 77], 0, 0] += [2.0, -3.0, 1.5]
    calibrator = Calibrator("linear", holdout=0.0).fit_sweep(node, result)
    channel = calibrator.fit_.channels[0]
    assert set(channel.outliers) == {3, 40, 77}
    assert channel.n_points == 97
    assert_within_uncertainty(channel, {"gain": 1.5, "offset": 0.5})


def test_outliers_pull_a_plain_fit():
    # The same data without the robust pass: the glitches pull the offset far from the truth.
    rng = np.random.default_rng(8)
    a = rng.uniform(-1, 1, 100)
    y = 1.5 * a + 0.5 + 0.01 * rng.standard_normal(100)
    y[[3, 40, 77]] += [2.0, 3.0, 1.5]
    plain = fit_channel(a, y, "linear", robust=False)
    robust = fit_channel(a, y, "linear")
    assert abs(plain.parameters["offset"] - 0.5) > 10 * robust.uncertainties["offset"]
    assert abs(robust.parameters["offset"] - 0.5) <= SIGMAS * robust.uncertainties["offset"]


def test_holdout_error_near_noise():
    node = TransferNode("tanh", np.array([[1.0, 1.5, 0.0, 0.0]] * 2), noise_std=0.02, seed=9)
    calibrator = Calibrator("tanh", sweep=Sweep(points=100, repeats=2), holdout=0.25).fit(node, progress=False)
    holdout = calibrator.holdout_error_
    assert holdout["n_points"] == 25
    # The error of a mean of 2 readings: 0.02 / sqrt(2), plus a little from the fit itself.
    for rms in holdout["rms"]:
        assert 0.01 < rms < 0.02
    assert calibrator.record_.holdout == holdout


def test_unconverged_fit_names_channel():
    rng = np.random.default_rng(10)
    a = rng.uniform(-2, 2, 80)
    y = get_model("cos2").function(a, 1.0, 0.7, 0.3, 0.0)
    with pytest.raises(CalibrationError, match=r"node 'mzi' output channel 2: the cos2 fit did not converge.*simpler model"):
        fit_channel(a, y, "cos2", channel=2, node="mzi", initial=[0.2, 3.0, 0.0, 0.5], max_evaluations=2)


def test_undetermined_parameter_is_reported():
    # A sweep that never leaves the linear part of tanh cannot separate amplitude from gain.
    a = np.linspace(-1e-4, 1e-4, 50)
    y = 1e-4 * np.sin(np.arange(50))
    with pytest.raises(CalibrationError, match="does not determine every parameter|did not converge"):
        fit_channel(a, y, "tanh", node="amp")


def test_constant_stimulus_is_reported():
    with pytest.raises(CalibrationError, match="node 'flat' output channel 0: the stimulus takes a single value"):
        fit_channel(np.zeros(20), np.arange(20.0), "linear", node="flat")


def test_too_few_valid_points():
    a = np.linspace(-1, 1, 10)
    y = np.full(10, np.nan)
    y[:3] = [0.0, 1.0, 2.0]
    with pytest.raises(CalibrationError, match="only 3 valid point"):
        fit_channel(a, y, "linear", node="dead")


def test_invalid_readings_are_left_out():
    rng = np.random.default_rng(11)
    a = rng.uniform(-1, 1, 60)
    y = np.stack([2.0 * a - 0.1 + 0.01 * rng.standard_normal(60) for _ in range(2)], axis=1)
    y[5, :] = np.nan
    y[7, 0] = np.nan
    fit = fit_channel(a, y, "linear")
    assert np.isnan(fit.residuals[5])
    assert np.isfinite(fit.residuals[7])
    assert fit.n_points == 59
    assert_within_uncertainty(fit, {"gain": 2.0, "offset": -0.1})


def test_fit_transfer_checks_shapes():
    with pytest.raises(ConfigError, match="does not match readings"):
        fit_transfer(np.zeros((10, 3)), np.zeros((10, 2, 4)), "linear")


def test_unknown_model_lists_the_models():
    with pytest.raises(ConfigError, match="unknown transfer model 'cubic'.*poly3"):
        get_model("cubic")


def test_summary_shows_uncertainties():
    node = TransferNode("linear", np.array([[2.0, 0.1]]), noise_std=0.01, seed=12)
    calibrator = Calibrator("linear", sweep=Sweep(points=40, repeats=2)).fit(node, progress=False)
    text = calibrator.fit_.summary()
    assert "gain" in text
    assert "+-" in text
    assert "y = gain * a + offset" in text
