"""Conformance suite: every Node implementation in tests/node_factories.py passes these checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pnn.errors import ConfigError, LimitError, PnnError
from pnn.nodes import GRADIENT_METHODS, Node, NodeState

from .node_factories import NODE_FACTORIES

BATCH = 5


@pytest.fixture(params=sorted(NODE_FACTORIES))
def node(request) -> Node:
    made = NODE_FACTORIES[request.param]()
    yield made
    made.close()


def valid_inputs(node: Node, batch: int = BATCH, seed: int = 0) -> np.ndarray:
    """Random inputs inside the node's input range (or in [-1, 1] where the range is wider)."""
    lo = np.maximum(node.input_spec.lower_array, -1.0)
    hi = np.minimum(node.input_spec.upper_array, 1.0)
    return np.random.default_rng(seed).uniform(lo, hi, (batch, node.n_in))


def test_declares_interface(node):
    assert node.gradient_method in GRADIENT_METHODS
    assert isinstance(node.output_unit, str)
    assert node.input_spec.shape == (node.n_in,)
    for name, spec in node.parameters.items():
        assert isinstance(name, str)
        assert spec.unit, f"parameter {name} has no unit"
        assert np.all(spec.lower_array <= spec.upper_array)
        assert spec.max_step > 0


def test_forward_shape_and_state(node):
    x = valid_inputs(node)
    y = node.forward(x)
    assert y.shape == (BATCH, node.n_out)
    assert np.all(np.isfinite(y))
    state = node.measure_state()
    assert isinstance(state, NodeState)
    assert state.inputs.shape == (BATCH, node.n_in)
    assert state.outputs.shape == (BATCH, node.n_out)
    np.testing.assert_array_equal(state.outputs, y)
    assert state.valid
    for probe in state.probes.values():
        assert probe.shape[0] == BATCH


def test_state_before_forward_raises(node):
    with pytest.raises(PnnError, match="no forward pass"):
        node.measure_state()


def test_forward_rejects_wrong_shape(node):
    with pytest.raises(ConfigError, match=f"shape \\(batch, {node.n_in}\\)"):
        node.forward(np.zeros((BATCH, node.n_in + 1)))
    with pytest.raises(ConfigError):
        node.forward(np.zeros(node.n_in))


def test_forward_rejects_nan(node):
    x = valid_inputs(node)
    x[0, 0] = np.nan
    with pytest.raises(LimitError, match="NaN"):
        node.forward(x)


def test_forward_enforces_input_range(node):
    upper = node.input_spec.upper_array
    x = valid_inputs(node)
    if np.max(upper) > 1e100:
        # A digital node declares no input range: a large input must pass through.
        x[0, 0] = 1e3
        assert np.all(np.isfinite(node.forward(x)))
        return
    x[0, 0] = upper[0] + 1.0
    with pytest.raises(LimitError, match="outside"):
        node.forward(x)


def test_set_returns_applied_values(node):
    for name, spec in node.parameters.items():
        target = 0.3 * spec.lower_array + 0.7 * spec.upper_array if np.all(np.abs(spec.upper_array) < 1e6) else np.full(spec.shape, 0.01)
        applied = node.set_parameters({name: target})
        np.testing.assert_allclose(applied[name], node.get_parameters()[name], rtol=0, atol=1e-6)
        resolution = spec.resolution or 1e-6
        assert np.max(np.abs(applied[name] - target)) <= resolution / 2 + 1e-6


def test_set_out_of_range_raises_and_keeps_values(node):
    for name, spec in node.parameters.items():
        before = node.get_parameters()[name]
        bad = np.array(before, copy=True)
        bad.flat[0] = float(spec.upper_array.flat[0]) + abs(float(spec.upper_array.flat[0])) + 1.0
        with pytest.raises(LimitError, match=f"{name!r}.*outside the allowed range"):
            node.set_parameters({name: bad})
        np.testing.assert_array_equal(node.get_parameters()[name], before)


def test_clip_is_explicit_and_counted(node):
    for name, spec in node.parameters.items():
        bad = np.array(node.get_parameters()[name], copy=True)
        bad.flat[0] = float(spec.upper_array.flat[0]) + abs(float(spec.upper_array.flat[0])) + 1.0
        applied = node.set_parameters({name: bad}, clip=True)
        assert applied[name].flat[0] <= spec.upper_array.flat[0] + spec.tolerance()
        assert node.pop_limit_events().get(name, 0) >= 1


def test_setters_reject_bad_requests(node):
    for name, spec in node.parameters.items():
        with pytest.raises(ConfigError, match="expected shape"):
            node.set_parameters({name: np.zeros(tuple(s + 1 for s in spec.shape))})
        nan = np.array(node.get_parameters()[name], copy=True)
        nan.flat[0] = np.nan
        with pytest.raises(LimitError, match="NaN"):
            node.set_parameters({name: nan})
        with pytest.raises(LimitError, match="NaN"):
            node.apply_update({name: np.where(np.isnan(nan), np.nan, 0.0)})
    with pytest.raises(ConfigError, match="unknown parameter"):
        node.apply_update({"no_such_parameter": np.zeros(1)})


def test_update_returns_applied_change(node):
    rng = np.random.default_rng(3)
    for name, spec in node.parameters.items():
        before = node.get_parameters()[name]
        step = min(spec.max_step, 0.05 * float(np.max(spec.upper_array - spec.lower_array)), 0.05)
        delta = rng.uniform(-step, step, spec.shape)
        applied = node.apply_update({name: delta}, clip=True)
        after = node.get_parameters()[name]
        np.testing.assert_allclose(applied[name], after - before, atol=1e-9)
        assert np.all(after >= spec.lower_array - spec.tolerance())
        assert np.all(after <= spec.upper_array + spec.tolerance())


def test_update_larger_than_max_step_raises(node):
    for name, spec in node.parameters.items():
        if math.isinf(spec.max_step):
            continue
        before = node.get_parameters()[name]
        delta = np.zeros(spec.shape)
        delta.flat[0] = 1.5 * spec.max_step
        with pytest.raises(LimitError, match="maximum change per update"):
            node.apply_update({name: delta})
        np.testing.assert_array_equal(node.get_parameters()[name], before)


def test_local_gradient_shapes(node):
    if not node.trainable:
        pytest.skip("node has no parameters")
    node.forward(valid_inputs(node))
    state = node.measure_state()
    error = np.random.default_rng(1).normal(size=(BATCH, node.n_out))
    grads = node.local_gradient(state, error)
    assert set(grads) == set(node.parameters)
    for name, grad in grads.items():
        assert grad.shape == node.parameters[name].shape
        assert np.all(np.isfinite(grad))
    with pytest.raises(ConfigError, match="does not match"):
        node.local_gradient(state, error[:, :-1] if node.n_out > 1 else np.zeros((BATCH, 2)))


def test_identity_is_json(node):
    info = node.identity()
    assert info["name"] == node.name
    assert info["kind"]
    json.dumps(info, default=str)


def test_state_dict_round_trip(node):
    if not node.trainable:
        pytest.skip("node has no parameters")
    saved = node.state_dict()
    before = node.get_parameters()
    for name, spec in node.parameters.items():
        step = min(spec.max_step, 0.05)
        node.apply_update({name: np.full(spec.shape, step)}, clip=True)
    node.load_state_dict(saved)
    after = node.get_parameters()
    for name in before:
        np.testing.assert_allclose(after[name], before[name], atol=1e-9)


def test_close_and_context_manager(node):
    with node as same:
        assert same is node
        node.forward(valid_inputs(node))
    assert node.closed
    with pytest.raises(PnnError, match="closed"):
        node.forward(valid_inputs(node))
    node.close()
