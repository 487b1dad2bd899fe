"""Instrument nodes on both emulators: the node contract, limits, ramps, faults, gradients.

The first group runs the node-contract checks on every instrument factory of
tests/node_factories.py; the rest covers what only instrument nodes do.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from .node_factories import NODE_FACTORIES
from pnn.devices import load_station
from pnn.emulators import EmulatedHardware, LayerSpec, ScpiEmulator, emulated_node
from pnn.errors import ConfigError, LimitError, MeasurementError, PnnError
from pnn.learning import forward_checked
from pnn.network import PhysicalNetwork

INSTRUMENT_FACTORIES = sorted(name for name in NODE_FACTORIES if name.startswith("instrument-"))


@pytest.fixture(params=INSTRUMENT_FACTORIES)
def node(request):
    node = NODE_FACTORIES[request.param]()
    yield node
    node.close()


def _inputs(node, batch=5, seed=0):
    rng = np.random.default_rng(seed)
    lo, hi = node.input_spec.lower_array, node.input_spec.upper_array
    return rng.uniform(lo, hi, (batch, node.n_in))


def _writes(node):
    return len(node.emulator.level_writes())


# ---------------------------------------------------------------------- node contract
def test_forward_shapes_and_state(node):
    with pytest.raises(PnnError, match="no forward pass"):
        node.measure_state()
    x = _inputs(node)
    y = node.forward(x)
    assert y.shape == (5, node.n_out)
    assert y.dtype == np.float64
    state = node.measure_state()
    assert state.valid
    assert state.inputs.shape == x.shape
    np.testing.assert_array_equal(state.outputs, y)
    np.testing.assert_allclose(state.inputs, x, atol=node.input_spec.resolution)


def test_bad_inputs_raise(node):
    with pytest.raises(ConfigError, match="expected an array of shape"):
        node.forward(np.zeros((2, node.n_in + 1)))
    with pytest.raises(LimitError, match="outside"):
        node.forward(np.full((1, node.n_in), 5.0))
    with pytest.raises(LimitError, match="NaN"):
        node.forward(np.full((1, node.n_in), np.nan))


def test_set_parameters_quantized_within_limits(node):
    spec = node.parameters["weight"]
    rng = np.random.default_rng(1)
    request = rng.uniform(spec.lower_array, spec.upper_array)
    applied = node.set_parameters({"weight": request})["weight"]
    assert np.all(applied >= spec.lower_array)
    assert np.all(applied <= spec.upper_array)
    assert np.max(np.abs(applied - request)) <= spec.resolution / 2 + 1e-12
    np.testing.assert_array_equal(node.get_parameters()["weight"], applied)


def test_out_of_range_set_writes_nothing(node):
    spec = node.parameters["weight"]
    before = _writes(node)
    with pytest.raises(LimitError, match="outside the allowed range"):
        node.set_parameters({"weight": np.full(spec.shape, float(spec.upper_array.max()) * 2)})
    assert _writes(node) == before


def test_update_larger_than_max_step(node):
    spec = node.parameters["weight"]
    before = _writes(node)
    with pytest.raises(LimitError, match="larger than the maximum change"):
        node.apply_update({"weight": np.full(spec.shape, spec.max_step * 1.5)})
    assert _writes(node) == before
    applied = node.apply_update({"weight": np.full(spec.shape, spec.max_step * 1.5)}, clip=True)["weight"]
    assert np.all(np.abs(applied) <= spec.max_step + 1e-12)
    assert node.pop_limit_events()["weight"] == spec.shape[0] * spec.shape[1]


def test_apply_update_returns_applied_change(node):
    spec = node.parameters["weight"]
    before = node.get_parameters()["weight"]
    delta = np.full(spec.shape, 3 * max(spec.resolution, 1e-3))
    applied = node.apply_update({"weight": delta})["weight"]
    np.testing.assert_allclose(node.get_parameters()["weight"], before + applied)
    np.testing.assert_allclose(applied, delta, atol=spec.resolution / 2 + 1e-12)


def test_unknown_parameter(node):
    with pytest.raises(ConfigError, match="unknown parameter"):
        node.set_parameters({"gain": 1.0})


def test_local_gradient_shapes(node):
    node.forward(_inputs(node, batch=4))
    error = np.random.default_rng(2).normal(size=(4, node.n_out))
    gradients = node.local_gradient(node.measure_state(), error)
    assert set(gradients) == set(node.parameters)
    for name, gradient in gradients.items():
        assert gradient.shape == node.parameters[name].shape
        assert np.all(np.isfinite(gradient))


def test_state_dict_round_trip(node):
    spec = node.parameters["weight"]
    node.set_parameters({"weight": np.full(spec.shape, 4 * max(spec.resolution, 0.01))})
    saved = node.state_dict()
    node.set_parameters({"weight": np.zeros(spec.shape)})
    node.load_state_dict(saved)
    np.testing.assert_array_equal(node.get_parameters()["weight"], saved["parameters"]["weight"])


def test_identity_is_serialisable(node):
    info = node.identity()
    text = json.dumps(info)
    assert "EMULATED" in text
    assert info["gradient"] in ("outer-product", "perturbation")


def test_close_applies_safe_state_and_stops_emulator(node):
    spec = node.parameters["weight"]
    node.set_parameters({"weight": np.full(spec.shape, 4 * max(spec.resolution, 0.01))})
    emulator = node.emulator
    node.close()
    node.close()
    assert node.closed
    assert not emulator.running
    first = emulator.hardware.channels[0].first_weight - 1
    np.testing.assert_array_equal(emulator.hardware.levels[first : first + node.n_in * node.n_out], 0.0)
    with pytest.raises(PnnError, match="closed"):
        node.forward(_inputs(node))


# --------------------------------------------------------------------- limits and ramps
def test_every_command_within_limits_and_steps(node):
    """Random updates, sets and safe states: the emulator's record never leaves the limits."""
    rng = np.random.default_rng(3)
    specs = node.parameters
    start = {name: np.zeros(spec.shape) for name, spec in specs.items()}
    for _ in range(15):
        action = rng.integers(3)
        if action == 0:
            delta = {name: rng.normal(0, 2 * spec.max_step, spec.shape) for name, spec in specs.items()}
            node.apply_update(delta, clip=True)
        elif action == 1:
            target = {name: rng.uniform(spec.lower_array, spec.upper_array) for name, spec in specs.items()}
            node.set_parameters(target)
        else:
            node.apply_safe_state()
    hardware = node.emulator.hardware
    channels = hardware.channels[0]
    limits = {}
    for name, first in (("weight", channels.first_weight), ("bias", channels.first_bias)):
        spec = specs[name]
        for k in range(int(np.prod(spec.shape))):
            limits[first + k] = (spec.lower_array.flat[k], spec.upper_array.flat[k], spec.max_step)
    last = {channel: start_value for channel, start_value in zip(limits, [0.0] * len(limits))}
    for _, channel, value in node.emulator.level_writes():
        lower, upper, max_step = limits[channel]
        assert lower - 1e-9 <= value <= upper + 1e-9
        assert abs(value - last[channel]) <= max_step * (1 + 1e-9)
        last[channel] = value


# --------------------------------------------------------------------------- faults
def test_overrange_reading_invalidates_the_batch():
    node = emulated_node("scpi", 6, 4, seed=0, timeout_s=1.0)
    try:
        # The readings of a row are the 4 outputs, then the 4 pre-activation probes.
        node.emulator.inject("overrange", index=9)
        network = PhysicalNetwork([node])
        with pytest.raises(MeasurementError, match="NaN"):
            forward_checked(network, _inputs(node, batch=3))
        state = node.measure_state()
        assert not state.valid
        assert np.isnan(state.outputs[1, 1])
        assert np.sum(np.isnan(state.outputs)) == 1
        with pytest.raises(MeasurementError, match="invalid measurement"):
            node.local_gradient(state, np.ones((3, node.n_out)))
        # The fault hit one batch only; the next one is valid again.
        assert forward_checked(network, _inputs(node, batch=3)).shape == (3, 4)
    finally:
        node.close()


def test_reconnect_changes_no_output():
    node = emulated_node("scpi", 6, 4, seed=0, timeout_s=1.0)
    try:
        spec = node.parameters["weight"]
        node.set_parameters({"weight": np.full(spec.shape, 6 * spec.resolution)})
        emulator = node.emulator
        levels_before = emulator.hardware.levels.copy()
        mark = len(emulator.record)
        emulator.drop_connections()
        node.reconnect()
        after = [entry.command.upper() for entry in emulator.record[mark:]]
        assert "*IDN?" in after
        assert not [c for c in after if c.startswith(("*RST", "INIT", "SOUR:SEQ:DATA")) or
                    ("VOLT " in c and "?" not in c)]
        np.testing.assert_array_equal(emulator.hardware.levels, levels_before)
        np.testing.assert_array_equal(node.get_parameters()["weight"], np.full(spec.shape, 6 * spec.resolution))
        assert node.instruments["emulator"].reconnects == 1
        assert node.forward(_inputs(node)).shape == (5, 4)
    finally:
        node.close()


def test_lost_connection_reconnects_on_next_exchange():
    node = emulated_node("scpi", 6, 4, seed=0, timeout_s=0.5, deadline_s=1.0)
    try:
        node.emulator.drop_connections()
        outputs = None
        for _ in range(3):
            try:
                outputs = node.forward(_inputs(node))
                break
            except PnnError:
                continue
        assert outputs is not None
        assert outputs.shape == (5, 4)
        assert node.instruments["emulator"].reconnects >= 1
    finally:
        node.close()


# ------------------------------------------------------------------ unknown start values
@pytest.fixture
def set_only_station(tmp_path):
    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")], seed=0)
    with ScpiEmulator(hardware) as emulator:
        def load(unknown_start: str):
            text = emulator.station_toml(timeout_s=1.0, extra_instrument_lines=(
                "[instruments.emulator.commands]", 'level_get = ""'))
            text = text.replace("max_step", f'unknown_start = "{unknown_start}"\nmax_step')
            path = tmp_path / f"{unknown_start}.toml"
            path.write_text(text)
            return emulator, load_station(path)
        yield load


def test_set_only_output_refuses_to_jump(set_only_station):
    emulator, station = set_only_station("refuse")
    # Even the safe state on exit refuses to ramp from an unknown level.
    with pytest.raises(LimitError, match="unknown"):
        with station:
            node = station.build_nodes()[0]
            assert np.all(np.isnan(node.get_parameters()["weight"]))
            with pytest.raises(LimitError, match="unknown"):
                node.apply_update({"weight": np.zeros((2, 3))})
            with pytest.raises(LimitError, match="unknown_start = 'safe'"):
                node.set_parameters({"weight": np.ones((2, 3))})
    weight_channels = range(4, 10)
    assert not [w for w in emulator.level_writes() if w[1] in weight_channels]


def test_set_only_output_starts_from_safe_value(set_only_station):
    emulator, station = set_only_station("safe")
    with station:
        node = station.build_nodes()[0]
        spec = node.parameters["weight"]
        node.set_parameters({"weight": np.full((2, 3), 1.0)})
        writes = [w for w in emulator.level_writes() if w[1] == 4]
        assert writes[0][2] == 0.0
        steps = np.abs(np.diff([w[2] for w in writes]))
        assert np.all(steps <= spec.max_step * (1 + 1e-9))
        assert abs(writes[-1][2] - 1.0) <= spec.resolution / 2


# ---------------------------------------------------------------------------- gradients
def test_outer_product_matches_measured_perturbation(tmp_path):
    """Two independent gradients, one from the declared model, one measured in situ, agree."""
    hardware = EmulatedHardware([LayerSpec(4, 3, "tanh")], preset="ideal", seed=0)
    with ScpiEmulator(hardware) as emulator:
        model_text = emulator.station_toml(timeout_s=1.0)
        measured_text = emulator.station_toml(timeout_s=1.0, gradient="perturbation").replace(
            'gradient = "perturbation"', 'gradient = "perturbation"\nperturbation_samples = 150')
        (tmp_path / "model.toml").write_text(model_text)
        (tmp_path / "measured.toml").write_text(measured_text)
        rng = np.random.default_rng(4)
        x = rng.uniform(-1, 1, (8, 4))
        error = rng.normal(size=(8, 3))
        weights = rng.uniform(-0.5, 0.5, (3, 4))
        gradients = {}
        for name in ("model", "measured"):
            with load_station(tmp_path / f"{name}.toml") as station:
                node = station.build_nodes()[0]
                node.set_parameters({"weight": weights, "bias": np.full(3, 0.1)})
                node.forward(x)
                gradients[name] = node.local_gradient(node.measure_state(), error)
                np.testing.assert_allclose(node.get_parameters()["weight"], weights)
    for key in ("weight", "bias"):
        a, b = gradients["model"][key].ravel(), gradients["measured"][key].ravel()
        cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cosine > 0.8, (key, cosine)


def test_outer_product_uses_preactivation_probe():
    node = emulated_node("scpi", 6, 4, seed=0, preset="ideal", timeout_s=1.0)
    try:
        assert node.has_preactivation
        assert node.has_input_gradient
        node.set_parameters({"weight": np.random.default_rng(5).uniform(-1, 1, (4, 6))})
        x = _inputs(node, batch=6)
        node.forward(x)
        state = node.measure_state()
        a = state.probes["preactivation"]
        np.testing.assert_allclose(np.tanh(a), state.outputs, atol=1e-6)
        error = np.ones((6, 4))
        gradient = node.local_gradient(state, error)["weight"]
        np.testing.assert_allclose(gradient, ((1 - np.tanh(a) ** 2).T @ state.inputs) / 6, rtol=1e-6)
        back = node.input_gradient(state, error)
        np.testing.assert_allclose(back, (1 - np.tanh(a) ** 2) @ node.get_parameters()["weight"], rtol=1e-6)
    finally:
        node.close()


def test_accumulate_mode_keeps_small_updates():
    node = emulated_node("scpi", 6, 4, seed=0, timeout_s=1.0)
    try:
        spec = node.parameters["weight"]
        small = np.full(spec.shape, spec.resolution * 0.3)
        total = np.zeros(spec.shape)
        for _ in range(10):
            total += node.apply_update({"weight": small})["weight"]
        # Ten updates of 0.3 steps add up to three whole steps, none of which is lost.
        np.testing.assert_allclose(total, 3 * spec.resolution, atol=spec.resolution * 0.51)
    finally:
        node.close()
