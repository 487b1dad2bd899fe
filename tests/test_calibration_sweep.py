"""Sweeps: designs, order, settling, repeats, limits, restoring parameters, units and files."""

from __future__ import annotations

import numpy as np
import pytest

from pnn.calibration import Sweep, SweepResult
from pnn.errors import ConfigError, LimitError, MeasurementError
from pnn.simulators import CROSSBAR_PRESETS, CrossbarNode

from .calibration_nodes import TransferNode


def ideal_crossbar(**options) -> CrossbarNode:
    return CrossbarNode(4, 3, config=CROSSBAR_PRESETS["ideal"], rng=0, name="xbar", **options)


def test_random_design_stays_in_range():
    node = TransferNode("linear", np.array([[1.0, 0.0]] * 3), lower=-2.0, upper=3.0)
    result = Sweep(points=50, repeats=2, inputs=(-1.5, 2.5)).run(node, progress=False)
    assert result.inputs.shape == (50, 3)
    assert result.outputs.shape == (50, 2, 3)
    assert result.times.shape == (50, 2)
    assert result.inputs.min() >= -1.5
    assert result.inputs.max() <= 2.5
    assert result.input_unit == "V"
    assert result.output_unit == "V"


def test_grid_design_steps_all_channels_together():
    node = TransferNode("linear", np.array([[1.0, 0.0]] * 2))
    result = Sweep(design="grid", points=5, repeats=1).run(node, progress=False)
    np.testing.assert_allclose(result.inputs[:, 0], [-1.0, -0.5, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(result.inputs[:, 1], result.inputs[:, 0])


def test_unswept_channels_hold_their_level():
    node = TransferNode("linear", np.array([[1.0, 0.0]] * 3))
    result = Sweep(points=20, repeats=1, channels=(1,), hold=0.25).run(node, progress=False)
    np.testing.assert_array_equal(result.inputs[:, 0], 0.25)
    np.testing.assert_array_equal(result.inputs[:, 2], 0.25)
    assert np.ptp(result.inputs[:, 1]) > 1.0


def test_shuffled_order_differs_per_repeat():
    node = TransferNode("linear", np.array([[1.0, 0.0]]), noise_std=0.0)
    result = Sweep(design="grid", points=30, repeats=3, batch_size=1).run(node, progress=False)
    orders = [np.argsort(result.times[:, r]) for r in range(3)]
    assert not np.array_equal(orders[0], np.arange(30))
    assert not np.array_equal(orders[0], orders[1])
    # Readings are stored by design point whatever the order: noise-free outputs match inputs.
    np.testing.assert_allclose(result.outputs[:, 0, 0], result.inputs[:, 0])


def test_unshuffled_order_follows_the_design():
    node = TransferNode("linear", np.array([[1.0, 0.0]]))
    result = Sweep(design="grid", points=10, repeats=1, batch_size=1, shuffle=False).run(node, progress=False)
    assert np.all(np.diff(result.times[:, 0]) >= 0)


def test_settling_waits_per_setting_and_repeat():
    waits = []
    node = ideal_crossbar()
    sweep = Sweep(points=4, repeats=2, settle_s=0.5, parameters={"bias": (-1.0, 1.0)}, parameter_points=3)
    sweep.run(node, progress=False, sleep=waits.append)
    assert waits == [0.5] * 6


def test_averages_reduce_noise():
    node = TransferNode("linear", np.array([[1.0, 0.0]] * 2), noise_std=0.1, seed=1)
    single = Sweep(points=200, repeats=3, averages=1).run(node, progress=False).noise_std()
    averaged = Sweep(points=200, repeats=3, averages=16).run(node, progress=False).noise_std()
    np.testing.assert_allclose(single, 0.1, rtol=0.15)
    np.testing.assert_allclose(averaged, 0.1 / 4, rtol=0.15)


def test_single_repeat_has_no_noise_level():
    node = TransferNode("linear", np.array([[1.0, 0.0]]))
    assert Sweep(points=10, repeats=1).run(node, progress=False).noise_std() is None


def test_parameter_sweep_records_values_and_restores():
    node = ideal_crossbar()
    before = node.get_parameters()
    sweep = Sweep(design="grid", points=6, repeats=1, parameters={"bias": (-0.5, 0.5)}, parameter_points=3)
    result = sweep.run(node, progress=False)
    assert result.n_points == 18
    assert result.swept_parameters["bias"].shape == (18, 3)
    levels = np.unique(np.round(result.swept_parameters["bias"][:, 0], 6))
    np.testing.assert_allclose(levels, [-0.5, 0.0, 0.5], atol=node.parameters["bias"].resolution + 1e-9)
    np.testing.assert_allclose(node.get_parameters()["bias"], before["bias"])
    np.testing.assert_allclose(node.get_parameters()["weight"], before["weight"])
    assert "weight" in result.fixed_parameters
    params = result.parameters(np.array([0, 5]))
    assert params["bias"].shape == (2, 3)
    assert params["weight"].shape == (3, 4)


class FailingNode(TransferNode):
    """Fails on the third forward pass, as an instrument that stops replying would."""

    def __init__(self):
        super().__init__("linear", np.array([[1.0, 0.0]]))
        self.calls = 0
        self.level = np.zeros(1)

    @property
    def parameters(self):
        from pnn.nodes import ParameterSpec

        return {"level": ParameterSpec((1,), -1.0, 1.0, "V")}

    def _read_parameters(self):
        return {"level": self.level}

    def _write_parameters(self, values):
        self.level = np.array(values["level"])
        return {"level": self.level.copy()}

    def _forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise MeasurementError("no reply")
        return super()._forward(x)


def test_parameters_restored_after_failure():
    node = FailingNode()
    node.set_parameters({"level": [0.3]})
    sweep = Sweep(points=4, repeats=1, parameters={"level": (-1.0, 1.0)}, parameter_points=4)
    with pytest.raises(MeasurementError, match="no reply"):
        sweep.run(node, progress=False)
    np.testing.assert_allclose(node.get_parameters()["level"], [0.3])


def test_input_range_outside_limits_names_node():
    node = ideal_crossbar()
    with pytest.raises(LimitError, match=r"node 'xbar': the sweep range \[-2, 2\] of the inputs leaves their allowed range \[-1, 1\]"):
        Sweep(inputs=(-2.0, 2.0)).run(node, progress=False)


def test_parameter_range_outside_limits_names_node():
    node = ideal_crossbar()
    with pytest.raises(LimitError, match=r"node 'xbar'.*parameter 'bias' leaves its allowed range"):
        Sweep(parameters={"bias": (-3.0, 0.0)}).check(node)


def test_hold_outside_limits_names_node():
    with pytest.raises(LimitError, match="node 'xbar': the hold level 5"):
        Sweep(channels=(0,), hold=5.0).check(ideal_crossbar())


def test_unknown_parameter_lists_the_parameters():
    with pytest.raises(ConfigError, match=r"no parameter 'gain' to sweep; its parameters are \['bias', 'weight'\]"):
        Sweep(parameters={"gain": (0.0, 1.0)}).check(ideal_crossbar())


def test_bad_channels_are_rejected():
    with pytest.raises(ConfigError, match="sweep channels"):
        Sweep(channels=(0, 9)).check(ideal_crossbar())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"design": "sobol"}, "unknown sweep design"),
        ({"points": 1}, "points must be an integer of at least 2"),
        ({"repeats": 0}, "repeats must be"),
        ({"settle_s": -1.0}, "settle_s"),
        ({"inputs": (1.0, -1.0)}, "lower < upper"),
        ({"parameters": {"bias": (0.0, float("nan"))}}, "finite"),
    ],
)
def test_invalid_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        Sweep(**settings)


def test_nothing_applied_when_range_is_wrong():
    node = ideal_crossbar()
    before = node.get_parameters()
    with pytest.raises(LimitError):
        Sweep(parameters={"bias": (-0.5, 5.0)}).run(node, progress=False)
    np.testing.assert_array_equal(node.get_parameters()["bias"], before["bias"])
    with pytest.raises(Exception, match="no forward pass"):
        node.measure_state()


def test_invalid_readings_are_counted():
    node = TransferNode("linear", np.array([[1.0, 0.0]] * 2))
    result = Sweep(points=10, repeats=2).run(node, progress=False)
    result.outputs[0, 0, 1] = np.nan
    assert result.n_invalid == 1
    assert np.isfinite(result.mean_outputs()[0, 1])


def test_save_and_load_round_trip(tmp_path):
    node = ideal_crossbar()
    result = Sweep(points=8, repeats=2, parameters={"bias": (-0.2, 0.2)}, parameter_points=2).run(node, progress=False)
    path = result.save(tmp_path / "sweep.npz")
    loaded = SweepResult.load(path)
    np.testing.assert_array_equal(loaded.outputs, result.outputs)
    np.testing.assert_array_equal(loaded.swept_parameters["bias"], result.swept_parameters["bias"])
    assert loaded.identity == result.identity
    assert loaded.settings == result.settings
    assert loaded.parameter_units == {"weight": "1", "bias": "1"}


def test_summary_and_pretty_print():
    node = TransferNode("linear", np.array([[1.0, 0.0]] * 2), noise_std=0.05)
    result = Sweep(points=10, repeats=2).run(node, progress=False)
    printed = []

    class Printer:
        def text(self, value):
            printed.append(value)

    result._repr_pretty_(Printer(), cycle=False)
    assert "Sweep of node 'transfer'" in printed[0]
    assert "noise (std of repeats)" in printed[0]
    assert "10 points x 2 repeats" in repr(result)


def test_node_pretty_print_shows_limits():
    printed = []

    class Printer:
        def text(self, value):
            printed.append(value)

    ideal_crossbar()._repr_pretty_(Printer(), cycle=False)
    assert printed[0].startswith("<CrossbarNode 'xbar': 4 -> 3")
    assert "inputs     4 channel(s) in [-1, 1]" in printed[0]
    assert "parameter  bias (3,) in [-1, 1]" in printed[0]


def test_progress_bar_counts_readings(capsys):
    node = TransferNode("linear", np.array([[1.0, 0.0]]))
    Sweep(points=10, repeats=2).run(node, progress=True)
    assert "sweep transfer" in capsys.readouterr().err
