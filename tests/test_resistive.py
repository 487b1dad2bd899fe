"""Tests of the resistive-network simulator: kernel against references, physics, gradients, errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg

from pnn.errors import ConfigError, LimitError, PnnError
from pnn.nodes import Node
from pnn.simulators import CrossbarNode, get_device
from pnn.simulators.resistive import (
    RESISTIVE_PRESETS,
    RESISTIVE_STAGES,
    ResistiveConfig,
    ResistiveNode,
    resistive_preset,
)
from pnn.simulators.resistive_reference import reference_settle_node

from tests.node_factories import NODE_FACTORIES

IDEAL = RESISTIVE_PRESETS["ideal"]
NO_NOISE = RESISTIVE_PRESETS["default"].without("read_noise")
TOPOLOGIES = [(), (5,), (6, 4), (5, 7, 3)]


def _inputs(batch: int, n_in: int, seed: int = 1, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-scale, scale, (batch, n_in))


def _strong_node(config: ResistiveConfig, hidden=(5,), diodes="all", seed=0) -> ResistiveNode:
    """A node whose first layer follows +x strongly, so that the diodes conduct.

    The conductances stay inside the range, so finite differences need no clipping.
    """
    node = ResistiveNode(4, 3, hidden=hidden, diodes=diodes, config=config, rng=seed)
    params = node.get_parameters()
    first = params["g_layer1"]
    first[:, :4] = 0.9 * config.g_max
    first[:, 4:8] = 2 * config.g_min
    node.set_parameters(params)
    return node


def _kcl_residual(node: ResistiveNode, x: np.ndarray, v: np.ndarray, nudge: np.ndarray | None = None):
    """Return the net current leaving every free node and the total branch current there, in A.

    Written independently of the kernels: one loop over conductances, diode law from Shockley.
    """
    cfg = node.config
    batch, n_free = v.shape
    leaving = np.zeros((batch, n_free))
    through = np.zeros((batch, n_free))
    sizes = [*node.hidden, node.n_out_nodes]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for layer, g in enumerate(node.physical_conductances().values()):
        g = g * 1e-6  # uS -> S
        if layer == 0:
            columns = np.concatenate([x, -x, np.full((batch, 1), cfg.v_bias), np.full((batch, 1), -cfg.v_bias)], 1)
        else:
            prev = v[:, offsets[layer - 1] : offsets[layer - 1] + sizes[layer - 1]]
            columns = np.concatenate([prev, np.full((batch, 1), cfg.v_bias), np.full((batch, 1), -cfg.v_bias)], 1)
        here = v[:, offsets[layer] : offsets[layer] + sizes[layer]]
        current = g[None] * (here[:, :, None] - columns[:, None, :])  # (batch, nodes, columns)
        leaving[:, offsets[layer] : offsets[layer] + sizes[layer]] += current.sum(axis=2)
        through[:, offsets[layer] : offsets[layer] + sizes[layer]] += np.abs(current).sum(axis=2)
        if layer > 0:
            into_prev = current[:, :, : sizes[layer - 1]]
            leaving[:, offsets[layer - 1] : offsets[layer - 1] + sizes[layer - 1]] -= into_prev.sum(axis=1)
            through[:, offsets[layer - 1] : offsets[layer - 1] + sizes[layer - 1]] += np.abs(into_prev).sum(axis=1)
    n_vt = cfg.diode_ideality * cfg.v_thermal
    diode = cfg.diode_i_sat * (np.exp((v - cfg.v_diode_bias) / n_vt) - np.exp((-v - cfg.v_diode_bias) / n_vt))
    diode = np.where(node.diode_mask, diode, 0.0)
    leaving += diode
    through += np.abs(diode)
    if nudge is not None:
        injected = nudge @ node.output_map
        leaving -= injected
        through += np.abs(injected)
    return leaving, through


# --------------------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize("hidden", TOPOLOGIES)
def test_kernel_matches_reference_free(hidden):
    node = _strong_node(NO_NOISE, hidden=hidden)
    x = _inputs(12, 4)
    node.forward(x)
    v = node.measure_state().probes["node_voltages"]
    v_ref, converged = reference_settle_node(node, x)
    assert converged.all()
    np.testing.assert_allclose(v, v_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("hidden", TOPOLOGIES)
def test_kernel_matches_reference_nudged(hidden):
    node = _strong_node(NO_NOISE, hidden=hidden)
    x = _inputs(12, 4)
    nudge = np.random.default_rng(3).normal(0, 1e-4, (12, 3))
    state = node.settle(x, nudge)
    v_ref, converged = reference_settle_node(node, x, nudge)
    assert converged.all()
    np.testing.assert_allclose(state.probes["node_voltages"], v_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("stage", [None, *RESISTIVE_STAGES])
def test_kernel_matches_reference_per_stage(stage):
    config = IDEAL if stage is None else IDEAL.replace(disabled=frozenset(set(RESISTIVE_STAGES) - {stage}))
    node = ResistiveNode(4, 3, hidden=(6,), config=config, rng=4)
    x = _inputs(10, 4, scale=1.0)
    noise_state = node.rng.bit_generator.state
    node.forward(x)
    measured = node.measure_state().probes["node_voltages"]
    v_ref, converged = reference_settle_node(node, x)
    assert converged.all()
    if stage == "read_noise":
        replay = np.random.default_rng()
        replay.bit_generator.state = noise_state
        v_ref = v_ref + config.read_noise_std * replay.standard_normal(v_ref.shape)
        assert np.max(np.abs(measured - v_ref)) < 1e-12
        assert np.std(measured - reference_settle_node(node, x)[0]) > 0.5 * config.read_noise_std
    else:
        np.testing.assert_allclose(measured, v_ref, rtol=0, atol=1e-12)


def test_stages_change_the_circuit():
    base = ResistiveNode(4, 3, hidden=(6,), config=IDEAL, rng=4).get_parameters()["g_layer1"]
    levels = ResistiveNode(4, 3, hidden=(6,), config=IDEAL.replace(disabled=frozenset({"device_variation", "read_noise"})), rng=4)
    step = levels.config.level_step
    programmed = levels.get_parameters()["g_layer1"]
    assert not np.allclose(programmed, base)
    np.testing.assert_allclose((programmed - levels.config.g_min) / step, np.round((programmed - levels.config.g_min) / step), atol=1e-9)
    varied = ResistiveNode(4, 3, hidden=(6,), config=IDEAL.replace(disabled=frozenset({"conductance_levels", "read_noise"})), rng=4)
    real = varied.physical_conductances()["g_layer1"]
    nominal = varied.get_parameters()["g_layer1"]
    spread = np.std(np.log(real / nominal))
    assert 0.5 * varied.config.g_dtod < spread < 2 * varied.config.g_dtod


# ------------------------------------------------------------------------------ physics oracles
@pytest.mark.parametrize("hidden", [(), (5,), (6, 4)])
def test_linear_network_equals_sparse_solve(hidden):
    node = ResistiveNode(4, 3, hidden=hidden, diodes="none", config=NO_NOISE, rng=2)
    x = _inputs(6, 4)
    node.forward(x)
    v = node.measure_state().probes["node_voltages"]

    # Nodal analysis built here from the conductance list: G_ii = sum of conductances at i,
    # G_ij = -conductance between free nodes, and source currents on the right-hand side.
    cfg = node.config
    sizes = [*hidden, node.n_out_nodes]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n_free = int(sum(sizes))
    for b in range(x.shape[0]):
        rows, cols, vals = [], [], []
        rhs = np.zeros(n_free)
        sources = np.concatenate([x[b], -x[b], [cfg.v_bias, -cfg.v_bias]])
        for layer, g in enumerate(node.physical_conductances().values()):
            n_prev = 2 * node.n_in if layer == 0 else sizes[layer - 1]
            for i in range(g.shape[0]):
                p = offsets[layer] + i
                for j in range(g.shape[1]):
                    rows.append(p), cols.append(p), vals.append(g[i, j])
                    if layer > 0 and j < n_prev:
                        q = offsets[layer - 1] + j
                        rows += [q, p, q]
                        cols += [q, q, p]
                        vals += [g[i, j], -g[i, j], -g[i, j]]
                    else:
                        rhs[p] += g[i, j] * (sources[j] if j < n_prev else sources[2 * node.n_in + j - n_prev])
        matrix = scipy.sparse.csc_matrix((vals, (rows, cols)), shape=(n_free, n_free))
        expected = scipy.sparse.linalg.spsolve(matrix, rhs)
        np.testing.assert_allclose(v[b], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("diodes", ["all", "none"])
@pytest.mark.parametrize("nudged", [False, True])
def test_kirchhoff_current_law_holds(diodes, nudged):
    node = _strong_node(NO_NOISE, hidden=(6, 4), diodes=diodes)
    x = _inputs(8, 4)
    nudge = np.random.default_rng(5).normal(0, 2e-5, (8, 3)) if nudged else None
    state = node.settle(x, nudge)
    v = state.probes["node_voltages"]
    if diodes == "all":
        assert np.max(np.abs(v)) > 0.3, "the diodes should conduct in this test"
    leaving, through = _kcl_residual(node, x, v, nudge)
    assert np.all(np.abs(leaving) <= 1e-9 * through)
    assert np.max(np.abs(leaving)) <= 1e-14


def test_outputs_are_differential_voltages():
    node = ResistiveNode(3, 2, hidden=(4,), config=NO_NOISE, rng=0)
    y = node.forward(_inputs(5, 3))
    v = node.measure_state().probes["node_voltages"]
    np.testing.assert_array_equal(y, v[:, 4:6] - v[:, 6:8])
    single = ResistiveNode(3, 2, config=NO_NOISE.replace(differential_outputs=False), rng=0)
    y = single.forward(_inputs(5, 3))
    np.testing.assert_array_equal(y, single.measure_state().probes["node_voltages"])


def test_diodes_clamp_node_voltages():
    linear = _strong_node(IDEAL, hidden=(), diodes="none")
    clamped = _strong_node(IDEAL, hidden=(), diodes="all")
    x = np.full((1, 4), 1.0)
    linear.forward(x)
    clamped.forward(x)
    v_linear = linear.measure_state().probes["node_voltages"]
    v_clamped = clamped.measure_state().probes["node_voltages"]
    assert np.max(v_linear) > 0.75
    assert np.max(v_clamped) < 0.55
    assert np.all(np.abs(v_clamped) <= np.abs(v_linear))


def test_voltage_drops_match_node_voltages():
    node = ResistiveNode(3, 2, hidden=(4,), config=NO_NOISE, rng=0)
    x = _inputs(5, 3)
    node.forward(x)
    state = node.measure_state()
    v = state.probes["node_voltages"]
    drop1 = state.probes["dv_g_layer1"]
    drop2 = state.probes["dv_g_layer2"]
    assert drop1.shape == (5, 4, 8)
    assert drop2.shape == (5, 4, 6)
    np.testing.assert_allclose(drop1[:, 2, 1], v[:, 2] - x[:, 1])
    np.testing.assert_allclose(drop1[:, 2, 4], v[:, 2] + x[:, 1])
    np.testing.assert_allclose(drop1[:, 3, 6], v[:, 3] - node.config.v_bias)
    np.testing.assert_allclose(drop2[:, 1, 3], v[:, 4 + 1] - v[:, 3])
    np.testing.assert_allclose(drop2[:, 0, 5], v[:, 4] + node.config.v_bias)


# ------------------------------------------------------------------------------- settle
def test_free_settle_equals_forward():
    node = ResistiveNode(4, 3, hidden=(5,), config=NO_NOISE, rng=0)
    x = _inputs(6, 4)
    y = node.forward(x)
    forward_state = node.measure_state()
    state = node.settle(x)
    np.testing.assert_array_equal(state.outputs, y)
    np.testing.assert_array_equal(state.probes["dv_g_layer2"], forward_state.probes["dv_g_layer2"])
    assert node.measure_state() is forward_state
    assert node.can_settle
    assert not Node.can_settle
    assert not CrossbarNode.can_settle


def test_warm_start_reaches_same_equilibrium():
    node = _strong_node(NO_NOISE)
    x = _inputs(6, 4)
    nudge = np.random.default_rng(1).normal(0, 1e-4, (6, 3))
    free = node.settle(x)
    cold = node.settle(x, nudge)
    warm = node.settle(x, nudge, initial=free)
    np.testing.assert_allclose(warm.probes["node_voltages"], cold.probes["node_voltages"], rtol=0, atol=1e-12)


def test_nudge_moves_outputs_along_current():
    node = ResistiveNode(4, 3, hidden=(5,), config=NO_NOISE, rng=0)
    x = _inputs(6, 4)
    free = node.settle(x)
    nudge = np.zeros((6, 3))
    nudge[:, 1] = 1e-5
    nudged = node.settle(x, nudge)
    change = nudged.outputs - free.outputs
    assert np.all(change[:, 1] > 0)
    assert np.all(np.abs(change[:, 1]) > 10 * np.abs(change[:, 0]))


def test_non_convergence_gives_invalid_state(caplog):
    node = _strong_node(IDEAL.replace(newton_max_iter=1))
    with caplog.at_level(logging.WARNING, logger="pnn.simulators.resistive"):
        y = node.forward(_inputs(4, 4))
    assert np.all(np.isnan(y))
    assert not node.measure_state().valid
    assert "did not converge" in caplog.text


# ------------------------------------------------------------------------------ reproducibility
def test_same_seed_gives_identical_outputs():
    x = _inputs(8, 4)
    first = ResistiveNode(4, 3, hidden=(5,), rng=11)
    second = ResistiveNode(4, 3, hidden=(5,), rng=11)
    for _ in range(2):
        np.testing.assert_array_equal(first.forward(x), second.forward(x))
    other = ResistiveNode(4, 3, hidden=(5,), rng=12)
    assert not np.array_equal(other.forward(x), first.forward(x))


def test_state_dict_restores_outputs():
    x = _inputs(8, 4)
    node = ResistiveNode(4, 3, hidden=(5,), rng=3)
    node.apply_update({"g_layer2": np.full((6, 7), 0.4)})
    saved = node.state_dict()
    expected = node.forward(x)
    copy = ResistiveNode(4, 3, hidden=(5,), rng=99)
    copy.load_state_dict(saved)
    np.testing.assert_array_equal(copy.forward(x), expected)
    np.testing.assert_array_equal(copy.get_parameters()["g_layer2"], node.get_parameters()["g_layer2"])


# ----------------------------------------------------------------------------- gradients
def _loss_and_error(outputs: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
    """A fixed linear loss, mean over the batch of sum(weights * y); its error is weights."""
    return float(np.mean(np.sum(weights * outputs, axis=1))), weights


@pytest.mark.parametrize("hidden", [(), (4,), (4, 3)])
def test_adjoint_gradient_matches_finite_differences(hidden):
    node = _strong_node(IDEAL, hidden=hidden)
    x = _inputs(5, 4)
    weights = np.random.default_rng(7).normal(size=(5, 3))
    node.forward(x)
    gradient = node.local_gradient(node.measure_state(), weights)

    h = 1e-3  # uS; the loss is smooth, so central differences are accurate to O(h^2)
    base = node.get_parameters()
    for key, value in base.items():
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            losses = []
            for sign in (1, -1):
                changed = {k: v.copy() for k, v in base.items()}
                changed[key][index] += sign * h
                node.set_parameters(changed, clip=True)
                losses.append(_loss_and_error(node.forward(x), weights)[0])
            numeric[index] = (losses[0] - losses[1]) / (2 * h)
        node.set_parameters(base)
        np.testing.assert_allclose(gradient[key], numeric, rtol=1e-5, atol=1e-9 * np.max(np.abs(numeric)))


def test_input_gradient_matches_finite_differences():
    node = _strong_node(IDEAL, hidden=(4,))
    x = _inputs(3, 4, scale=0.8)
    weights = np.random.default_rng(8).normal(size=(3, 3))
    node.forward(x)
    gradient = node.input_gradient(node.measure_state(), weights)
    h = 1e-6
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += h
        minus[index] -= h
        # Per-example gradient: the loss of example b is sum(weights[b] * y[b]).
        b = index[0]
        numeric[index] = (weights[b] @ node.forward(plus)[b] - weights[b] @ node.forward(minus)[b]) / (2 * h)
    np.testing.assert_allclose(gradient, numeric, rtol=1e-5, atol=1e-8)


def _ep_estimate(node: ResistiveNode, x: np.ndarray, error: np.ndarray, beta: float) -> dict[str, np.ndarray]:
    """Equilibrium propagation estimate from two settles, using only voltage drops (1/uS)."""
    free = node.settle(x)
    nudged = node.settle(x, -beta * error, initial=free)
    return {
        key: 1e-6 / (2 * beta) * np.mean(nudged.probes[f"dv_{key}"] ** 2 - free.probes[f"dv_{key}"] ** 2, axis=0)
        for key in node.parameters
    }


def test_ep_equals_adjoint_on_linear_network():
    node = ResistiveNode(4, 3, hidden=(5,), diodes="none", config=IDEAL, rng=6)
    x = _inputs(6, 4)
    targets = np.random.default_rng(9).uniform(-0.2, 0.2, (6, 3))
    y = node.forward(x)
    error = y - targets  # dLoss/dy of 1/2 ||y - t||^2, in 1/V
    adjoint = node.local_gradient(node.measure_state(), error)
    # beta in A per (1/V): nudge currents near 1e-10 A against branch currents near 1e-5 A.
    ep = _ep_estimate(node, x, error, beta=1e-9)
    for key in adjoint:
        scale = np.max(np.abs(adjoint[key]))
        np.testing.assert_allclose(ep[key], adjoint[key], rtol=0, atol=1e-5 * scale)


def test_ep_error_shrinks_with_beta_on_diode_network():
    node = _strong_node(IDEAL, hidden=(5,))
    x = _inputs(6, 4)
    error = np.random.default_rng(10).normal(size=(6, 3))
    node.forward(x)
    adjoint = node.local_gradient(node.measure_state(), error)["g_layer1"]
    errors = []
    for beta in (1e-7, 1e-8):
        estimate = _ep_estimate(node, x, error, beta)["g_layer1"]
        errors.append(np.max(np.abs(estimate - adjoint)) / np.max(np.abs(adjoint)))
    assert errors[1] < 1e-2
    assert errors[1] < 0.3 * errors[0]


def test_local_gradient_lowers_loss_on_toy_task():
    # Two-class toy task: the output should read +0.2 V when x0 > x1 and -0.2 V otherwise.
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (64, 2))
    targets = np.where(x[:, :1] > x[:, 1:], 0.2, -0.2)
    node = ResistiveNode(2, 1, hidden=(6,), rng=1)

    def loss() -> float:
        return float(np.mean((node.forward(x) - targets) ** 2))

    initial = loss()
    for _ in range(40):
        y = node.forward(x)
        gradient = node.local_gradient(node.measure_state(), y - targets)
        largest = max(np.max(np.abs(g)) for g in gradient.values())
        # Steepest descent with the largest change fixed at 3 uS, as a pulse budget would set it.
        node.apply_update({k: -3.0 * g / largest for k, g in gradient.items()}, clip=True)
    final = loss()
    accuracy = np.mean(np.sign(node.forward(x)) == np.sign(targets))
    assert final < 0.5 * initial
    assert accuracy > 0.85


def test_apply_update_accumulates_small_changes():
    node = ResistiveNode(2, 1, rng=0)
    step = node.config.level_step
    before = node.get_parameters()["g_layer1"].copy()
    # Keep every device away from the top of the range so the update is not clipped.
    before = np.clip(before, node.config.g_min, node.config.g_max - 2 * step)
    node.set_parameters({"g_layer1": before})
    before = node.get_parameters()["g_layer1"]
    applied = node.apply_update({"g_layer1": np.full(before.shape, 0.4 * step)})
    np.testing.assert_array_equal(applied["g_layer1"], 0.0)
    applied = node.apply_update({"g_layer1": np.full(before.shape, 0.7 * step)})
    np.testing.assert_allclose(applied["g_layer1"], step)
    np.testing.assert_allclose(node.get_parameters()["g_layer1"], before + step)


# ---------------------------------------------------------------------------- bad input
def test_non_finite_conductance_raises():
    node = ResistiveNode(3, 2, rng=0)
    params = node.get_parameters()
    params["g_layer1"][0, 0] = np.nan
    with pytest.raises(LimitError, match="NaN or infinite"):
        node.set_parameters(params)
    params["g_layer1"][0, 0] = np.inf
    with pytest.raises(LimitError, match="NaN or infinite"):
        node.set_parameters(params)


def test_out_of_range_conductance_raises():
    node = ResistiveNode(3, 2, rng=0)
    params = node.get_parameters()
    params["g_layer1"][1, 2] = -5.0
    with pytest.raises(LimitError, match=r"outside the allowed range \[1, 100\] uS"):
        node.set_parameters(params)
    params["g_layer1"][1, 2] = 1000.0
    with pytest.raises(LimitError, match="1000"):
        node.set_parameters(params)


def test_wrong_input_shape_raises():
    node = ResistiveNode(3, 2, rng=0)
    with pytest.raises(ConfigError, match=r"expected an array of shape \(batch, 3\), got \(4, 2\)"):
        node.forward(np.zeros((4, 2)))
    with pytest.raises(ConfigError, match=r"shape \(batch, 3\)"):
        node.settle(np.zeros(3))


def test_input_out_of_range_raises():
    node = ResistiveNode(3, 2, rng=0)
    with pytest.raises(LimitError, match="outside"):
        node.forward(np.full((1, 3), 2.5))


def test_bad_nudge_raises():
    node = ResistiveNode(3, 2, rng=0)
    x = np.zeros((4, 3))
    with pytest.raises(ConfigError, match=r"shape \(4, 2\) in amperes, got shape \(4, 3\)"):
        node.settle(x, np.zeros((4, 3)))
    with pytest.raises(ConfigError, match="NaN or infinite"):
        node.settle(x, np.full((4, 2), np.nan))


def test_unknown_preset_raises():
    with pytest.raises(ConfigError, match="unknown resistive preset 'memristor'; choose one of default, ideal"):
        resistive_preset("memristor")
    with pytest.raises(ConfigError, match="unknown resistive preset"):
        ResistiveNode(3, 2, preset="memristor")
    with pytest.raises(ConfigError, match="unknown resistive preset"):
        get_device("resistive").config("memristor")


def test_bad_settings_raise():
    with pytest.raises(ConfigError, match="unknown resistive stage"):
        ResistiveConfig().without("drift")
    with pytest.raises(ConfigError, match="unknown resistive setting"):
        ResistiveConfig().replace(g_maximum=3.0)
    with pytest.raises(ConfigError, match="0 < g_min < g_max"):
        ResistiveConfig(g_min=5.0, g_max=2.0)
    with pytest.raises(ConfigError, match="diode_ideality must be a positive number"):
        ResistiveConfig(diode_ideality=0.0)
    with pytest.raises(ConfigError, match="levels must be an integer"):
        ResistiveConfig(levels=1)
    with pytest.raises(ConfigError, match="g_max must be of type float, got 'high'"):
        ResistiveConfig(g_max="high")
    with pytest.raises(ConfigError, match="differential_outputs must be of type bool"):
        ResistiveConfig(differential_outputs=1)
    with pytest.raises(ConfigError, match="g_max must be a positive number|0 < g_min < g_max"):
        ResistiveConfig(g_max=float("nan"))
    with pytest.raises(ConfigError, match="hidden layer widths"):
        ResistiveNode(3, 2, hidden=(4, 0))
    with pytest.raises(ConfigError, match="diodes must be one of"):
        ResistiveNode(3, 2, diodes="some")


def test_bad_initial_state_raises():
    node = ResistiveNode(3, 2, rng=0)
    other = ResistiveNode(3, 2, hidden=(4,), rng=0)
    other.forward(np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="initial state has node voltages of shape"):
        node.settle(np.zeros((2, 3)), initial=other.measure_state())


# ------------------------------------------------------------------------------ registry
def test_device_registry_builds_layers():
    kind = get_device("resistive")
    assert set(kind.presets) == {"default", "ideal"}
    config = kind.config("ideal", {"v_bias": 0.5})
    assert config.v_bias == 0.5
    assert config.disabled == frozenset(RESISTIVE_STAGES)
    rng = np.random.default_rng(0)
    hidden_layer = kind.build(5, 4, name="r1", activation="tanh", config=config, rng=rng, preset="ideal")
    output_layer = kind.build(4, 3, name="r2", activation="linear", config=config, rng=rng, preset="ideal")
    assert hidden_layer.diode_mask.all()
    assert not output_layer.diode_mask.any()
    y = output_layer.forward(hidden_layer.forward(_inputs(2, 5)))
    assert y.shape == (2, 3)
    with pytest.raises(ConfigError, match="activation must be one of"):
        kind.build(5, 4, name="r3", activation="relu", config=config, rng=rng)


def test_identity_names_settings():
    node = ResistiveNode(3, 2, hidden=(4,), rng=5, preset="ideal")
    info = node.identity()
    assert info["kind"] == "ResistiveNode"
    assert info["seed"] == 5
    assert info["hidden"] == [4]
    assert info["config"]["disabled"] == sorted(RESISTIVE_STAGES)


# ----------------------------------------------------------------------------- node contract
@pytest.mark.parametrize("factory", [k for k in NODE_FACTORIES if k.startswith("resistive")])
def test_node_contract(factory):
    node = NODE_FACTORIES[factory]()
    x = _inputs(3, node.n_in)
    y = node.forward(x)
    state = node.measure_state()
    assert y.shape == (3, node.n_out)
    assert y.dtype == node.dtype
    assert state.valid
    assert node.output_unit == "V"
    assert node.gradient_method == "adjoint"

    params = node.get_parameters()
    applied = node.set_parameters(params)
    for key, spec in node.parameters.items():
        assert spec.unit == "uS"
        assert params[key].shape == spec.shape
        np.testing.assert_allclose(applied[key], params[key], rtol=0, atol=1e-9)
        assert np.all(params[key] >= spec.lower_array)
        assert np.all(params[key] <= spec.upper_array)
    zero = node.apply_update({k: np.zeros(s.shape) for k, s in node.parameters.items()})
    assert all(np.all(v == 0) for v in zero.values())

    error = np.ones_like(y)
    gradient = node.local_gradient(state, error)
    assert {k: g.shape for k, g in gradient.items()} == {k: s.shape for k, s in node.parameters.items()}
    assert all(np.all(np.isfinite(g)) for g in gradient.values())
    assert node.input_gradient(state, error).shape == x.shape
    with pytest.raises(ConfigError, match="pre-activation"):
        node.local_gradient(state, error, at="preactivation")

    json.dumps(node.identity())
    node.close()
    with pytest.raises(PnnError, match="closed"):
        node.forward(x)
