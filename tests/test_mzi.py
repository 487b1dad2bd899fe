"""Tests of the MZI mesh simulator: kernels against NumPy, physics oracles, gradients, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from .optics_helpers import toy_blobs, train_dfa
from scipy.stats import unitary_group

from pnn.activations import get_activation
from pnn.errors import ConfigError, LimitError
from pnn.simulators import get_device
from pnn.simulators._optics import perturbation_codes, wrap_phase
from pnn.simulators.mzi import (
    MZI_PRESETS,
    STAGES,
    MeshPhases,
    MziConfig,
    MziNode,
    build_unitary,
    decompose,
    mesh_layout,
    mzi_preset,
)

IDEAL = MZI_PRESETS["ideal"]
Q = 1.602176634e-19


def only(stage: str | None) -> MziConfig:
    """The ideal preset with one stage switched back on (None: every stage off)."""
    if stage is None:
        return IDEAL
    return IDEAL.replace(disabled=IDEAL.disabled - {stage})


# --------------------------------------------------------------------------- slow reference
def coupler(alpha: float) -> np.ndarray:
    c, s = math.cos(math.pi / 4 + alpha), math.sin(math.pi / 4 + alpha)
    return np.array([[c, 1j * s], [1j * s, c]])


def reference_matrix(node: MziNode, phases: dict[str, np.ndarray]) -> np.ndarray:
    """Device transfer matrix built MZI by MZI as full N x N matrices, from the module's model."""
    n = node.n_modes
    cfg = node.config
    column_start, top_mode = mesh_layout(n)
    column_of = np.repeat(np.arange(n), np.diff(column_start))
    theta = np.array(phases["theta"], dtype=float)
    phi = np.array(phases["phi"], dtype=float)
    if cfg.enabled("crosstalk"):
        theta_eff, phi_eff = theta.copy(), phi.copy()
        for i in range(theta.size):
            for j in range(theta.size):
                if column_of[i] == column_of[j] and abs(top_mode[i] - top_mode[j]) == 2:
                    theta_eff[i] += cfg.crosstalk * theta[j]
                    phi_eff[i] += cfg.crosstalk * phi[j]
        theta, phi = theta_eff, phi_eff
    u = np.eye(n, dtype=complex)
    for i in range(theta.size):
        m = top_mode[i]
        block = (
            node.amplitude[i]
            * coupler(node.alpha_out[i])
            @ np.diag([np.exp(1j * theta[i]), 1.0])
            @ coupler(node.alpha_in[i])
            @ np.diag([np.exp(1j * phi[i]), 1.0])
        )
        full = np.eye(n, dtype=complex)
        full[m : m + 2, m : m + 2] = block
        u = full @ u
    return u


def reference_forward(node: MziNode, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Slow forward pass of the device with every enabled stage, drawing noise in kernel order."""
    cfg = node.config
    n = node.n_modes
    x = np.array(x, dtype=float)
    if cfg.enabled("input_dac"):
        steps = 2 ** (cfg.input_dac_bits - 1) - 1
        x = np.round(x * steps) / steps
    u = reference_matrix(node, node.phases)

    # Readout scales, from the documented formulas.
    gain = 1.0 if node.activation.upper < np.inf else cfg.logit_gain
    p_ref = (node.n_in + cfg.bias_modes * cfg.bias_amplitude**2) / n
    transmission = 10 ** (-cfg.loss_db * (n - 1) / 10) if cfg.enabled("loss") else 1.0
    current_ref = cfg.responsivity_a_per_w * cfg.power_mw * 1e-3 * p_ref * transmission / gain
    bandwidth = cfg.bandwidth_ghz * 1e9
    full_scale = cfg.adc_full_scale if node.activation.upper < np.inf else cfg.output_full_scale

    a = np.zeros((x.shape[0], node.n_out))
    for b in range(x.shape[0]):
        field_in = np.zeros(n, dtype=complex)
        field_in[: node.n_in] = x[b]
        field_in[node.n_in : node.n_in + cfg.bias_modes] = cfg.bias_amplitude
        power = np.abs(u @ field_in) ** 2
        for j in range(node.n_out):
            value = gain * (power[2 * j] - power[2 * j + 1]) / (p_ref * transmission)
            variance = 0.0
            if cfg.enabled("shot_noise"):
                current = cfg.responsivity_a_per_w * cfg.power_mw * 1e-3 * (power[2 * j] + power[2 * j + 1])
                variance += 2 * Q * bandwidth * current / current_ref**2
            if cfg.enabled("dark_noise"):
                variance += 2 * 2 * Q * bandwidth * cfg.dark_current_na * 1e-9 / current_ref**2
            if variance > 0:
                value += math.sqrt(variance) * rng.standard_normal()
            if cfg.enabled("saturation"):
                value = min(full_scale, max(-full_scale, value))
            if cfg.enabled("adc"):
                steps = 2 ** (cfg.adc_bits - 1) - 1
                value = np.round(value / full_scale * steps) / steps * full_scale
            a[b, j] = value
    return a, node.activation.f(a)


# ------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("activation", ["tanh", "linear"])
@pytest.mark.parametrize("stage", [None, *STAGES])
def test_forward_matches_reference(stage, activation):
    config = only(stage)
    if stage in ("shot_noise", "dark_noise"):
        # Raise the noise so that a wrong draw order or scale would show.
        config = config.replace(power_mw=1e-4, dark_current_na=1e4)
    node = MziNode(5, 3, config=config, rng=3, activation=activation)
    x = np.random.default_rng(1).uniform(-1, 1, (6, 5))
    noise_rng = np.random.default_rng()
    noise_rng.bit_generator.state = node.rng.bit_generator.state
    y = node.forward(x)
    a = node.measure_state().probes["preactivation"]
    a_ref, y_ref = reference_forward(node, x, noise_rng)
    np.testing.assert_allclose(a, a_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-12)


def test_each_stage_changes_output():
    x = np.random.default_rng(2).uniform(-1, 1, (8, 5))
    ideal = MziNode(5, 3, config=IDEAL, rng=4).forward(x)
    for stage in STAGES:
        config = only(stage)
        if stage == "dark_noise":
            config = config.replace(dark_current_na=1e4)
        if stage == "saturation":
            config = config.replace(adc_full_scale=0.1)
        changed = MziNode(5, 3, config=config, rng=4).forward(x)
        assert not np.array_equal(changed, ideal), stage


def test_device_matrix_matches_reference():
    node = MziNode(4, 3, config=MZI_PRESETS["default"], rng=5)
    np.testing.assert_allclose(node.device_matrix(), reference_matrix(node, node.phases), atol=1e-12)


# ------------------------------------------------------------------------------- physics
def test_ideal_mesh_is_unitary():
    rng = np.random.default_rng(6)
    for n in (2, 5, 8, 16):
        count = n * (n - 1) // 2
        phases = MeshPhases(rng.uniform(0, 2 * np.pi, count), rng.uniform(0, 2 * np.pi, count), rng.uniform(0, 2 * np.pi, n))
        u = build_unitary(phases)
        assert np.linalg.norm(u.conj().T @ u - np.eye(n)) < 1e-10
    node = MziNode(6, 4, config=IDEAL, rng=7)
    u = node.device_matrix()
    assert np.linalg.norm(u.conj().T @ u - np.eye(node.n_modes)) < 1e-10


def test_lossy_mesh_loses_power():
    node = MziNode(6, 4, config=only("loss"), rng=7)
    u = node.device_matrix()
    singular = np.linalg.svd(u, compute_uv=False)
    assert singular.max() < 1.0


@pytest.mark.parametrize("n", [2, 3, 4, 7, 8, 12])
def test_decompose_round_trip(n):
    u = unitary_group.rvs(n, random_state=n)
    phases = decompose(u)
    assert phases.theta.shape == (n * (n - 1) // 2,)
    assert np.all((phases.theta >= 0) & (phases.theta < 2 * np.pi))
    assert np.linalg.norm(build_unitary(phases) - u) < 1e-8


def test_decompose_identity_and_permutation():
    for u in (np.eye(4), np.eye(5)[[1, 0, 3, 2, 4]]):
        assert np.linalg.norm(build_unitary(decompose(u)) - u) < 1e-8


def test_node_realises_decomposed_unitary():
    n = 6
    u = unitary_group.rvs(n, random_state=11)
    phases = decompose(u)
    node = MziNode(5, 3, config=IDEAL, rng=0)
    assert node.n_modes == n
    node.set_parameters({"theta": phases.theta, "phi": phases.phi})
    # Intensity detection does not see the output phase screen.
    np.testing.assert_allclose(np.abs(node.device_matrix()), np.abs(u), atol=1e-9)


# ----------------------------------------------------------------------------- gradients
def finite_difference(node, inputs, error, name, eps=1e-6):
    base = node.get_parameters()
    grad = np.zeros_like(base[name])
    for i in range(grad.size):
        plus = {k: v.copy() for k, v in base.items()}
        minus = {k: v.copy() for k, v in base.items()}
        plus[name][i] += eps
        minus[name][i] -= eps
        loss_plus = np.sum(error * node._measure(inputs, plus)[1])
        loss_minus = np.sum(error * node._measure(inputs, minus)[1])
        grad[i] = (loss_plus - loss_minus) / (2 * eps) / inputs.shape[0]
    return grad


@pytest.mark.parametrize("activation", ["tanh", "linear"])
def test_adjoint_gradient_matches_finite_differences(activation):
    node = MziNode(5, 3, config=IDEAL, rng=8, activation=activation)
    x = np.random.default_rng(3).uniform(-1, 1, (7, 5))
    node.forward(x)
    state = node.measure_state()
    error = np.random.default_rng(4).standard_normal((7, 3))
    grads = node.local_gradient(state, error)
    for name in ("theta", "phi"):
        expected = finite_difference(node, state.inputs, error, name)
        np.testing.assert_allclose(grads[name], expected, atol=1e-8)


def test_adjoint_input_gradient_matches_finite_differences():
    node = MziNode(4, 3, config=IDEAL, rng=9, activation="sigmoid")
    x = np.random.default_rng(5).uniform(-1, 1, (3, 4))
    node.forward(x)
    state = node.measure_state()
    error = np.random.default_rng(6).standard_normal((3, 3))
    grad_x = node.input_gradient(state, error)
    expected = np.zeros_like(x)
    for b in range(3):
        for k in range(4):
            plus, minus = state.inputs.copy(), state.inputs.copy()
            plus[b, k] += 1e-6
            minus[b, k] -= 1e-6
            change = np.sum(error * node._measure(plus, node.phases)[1]) - np.sum(error * node._measure(minus, node.phases)[1])
            expected[b, k] = change / 2e-6
    np.testing.assert_allclose(grad_x, expected, atol=1e-8)


def test_preactivation_error_gradient():
    node = MziNode(4, 2, config=IDEAL, rng=10, activation="tanh")
    node.forward(np.random.default_rng(7).uniform(-1, 1, (5, 4)))
    state = node.measure_state()
    error = np.random.default_rng(8).standard_normal((5, 2))
    at_output = node.local_gradient(state, error)
    derivative = 1 - np.tanh(state.probes["preactivation"]) ** 2
    at_pre = node.local_gradient(state, error * derivative, at="preactivation")
    np.testing.assert_allclose(at_pre["theta"], at_output["theta"], atol=1e-12)


def cosine(a: dict, b: dict) -> float:
    u = np.concatenate([a[k].ravel() for k in sorted(a)])
    v = np.concatenate([b[k].ravel() for k in sorted(b)])
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def test_perturbation_gradient_agrees_with_adjoint():
    x = np.random.default_rng(9).uniform(-1, 1, (16, 5))
    error = np.random.default_rng(10).standard_normal((16, 3))
    adjoint = MziNode(5, 3, config=IDEAL, rng=12)
    perturb = MziNode(5, 3, config=IDEAL.replace(gradient_method="perturbation"), rng=12)
    assert perturb.gradient_method == "perturbation"
    adjoint.forward(x)
    perturb.forward(x)
    before = perturb.get_parameters()
    g_model = adjoint.local_gradient(adjoint.measure_state(), error)
    g_measured = perturb.local_gradient(perturb.measure_state(), error)
    assert cosine(g_model, g_measured) > 0.9
    after = perturb.get_parameters()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_random_code_perturbation_on_default_device():
    # Random sign codes on the realistic device: noisy, but pointing the right way.
    config = MZI_PRESETS["default"].replace(gradient_method="perturbation", perturbation_samples=400)
    node = MziNode(4, 2, config=config, rng=13)
    model = MziNode(4, 2, config=MZI_PRESETS["default"], rng=13)
    x = np.random.default_rng(11).uniform(-1, 1, (32, 4))
    error = np.random.default_rng(12).standard_normal((32, 2))
    node.forward(x)
    model.forward(x)
    assert cosine(node.local_gradient(node.measure_state(), error), model.local_gradient(model.measure_state(), error)) > 0.5


# ------------------------------------------------------------------------- reproducibility
def test_same_seed_bit_identical():
    x = np.random.default_rng(13).uniform(-1, 1, (10, 5))
    outputs = []
    for _ in range(2):
        node = MziNode(5, 3, config=MZI_PRESETS["default"].replace(gradient_method="perturbation", perturbation_samples=8), rng=21)
        y = node.forward(x)
        grad = node.local_gradient(node.measure_state(), np.ones((10, 3)))
        outputs.append((y, grad["theta"]))
    assert np.array_equal(outputs[0][0], outputs[1][0])
    assert np.array_equal(outputs[0][1], outputs[1][1])


def test_state_dict_restores_outputs():
    x = np.random.default_rng(14).uniform(-1, 1, (4, 3))
    node = MziNode(3, 2, rng=22)
    node.forward(x)
    saved = node.state_dict()
    first = node.forward(x)
    other = MziNode(3, 2, rng=99)
    other.load_state_dict(saved)
    assert np.array_equal(other.forward(x), first)


# ------------------------------------------------------------------------------- updates
def test_setpoint_past_one_turn_wraps_on_device():
    node = MziNode(3, 2, config=IDEAL, rng=15)
    theta = np.full(node.parameters["theta"].shape, 6.2)
    node.set_parameters({"theta": theta})
    applied = node.apply_update({"theta": np.full_like(theta, 0.2)})
    np.testing.assert_allclose(node.get_parameters()["theta"], 6.4, atol=1e-12)
    np.testing.assert_allclose(applied["theta"], 0.2, atol=1e-12)
    np.testing.assert_allclose(node.phases["theta"], 6.4 - 2 * np.pi, atol=1e-12)
    # One turn more on every setpoint leaves the light unchanged.
    x = np.random.default_rng(2).uniform(-1, 1, (3, 3))
    before = node.forward(x)
    node.set_parameters({"theta": theta + 0.2 - 2 * np.pi})
    np.testing.assert_allclose(node.forward(x), before, atol=1e-12)


def test_update_past_setpoint_range_raises():
    node = MziNode(3, 2, config=IDEAL, rng=15)
    top = node.parameters["theta"].upper_array.copy()
    node.set_parameters({"theta": top - 0.1})
    with pytest.raises(LimitError, match="outside the allowed range"):
        node.apply_update({"theta": np.full_like(top, 0.2)})
    np.testing.assert_allclose(node.get_parameters()["theta"], top - 0.1)


def test_small_updates_accumulate_below_resolution():
    node = MziNode(3, 2, config=IDEAL.replace(disabled=IDEAL.disabled - {"phase_resolution"}, phase_bits=4), rng=16)
    step = node.parameters["theta"].resolution
    start = node.get_parameters()["theta"]
    total = np.zeros_like(start)
    for _ in range(3):
        total += node.apply_update({"theta": np.full_like(start, 0.3 * step)})["theta"]
    # 0.9 of a step was requested in total; every phase moved by one step or none.
    moved = np.abs(total) > 0
    assert np.all(np.isclose(np.abs(total[moved]), step))
    assert moved.any()


def test_update_larger_than_max_step_raises():
    node = MziNode(3, 2, rng=17)
    with pytest.raises(LimitError, match="maximum change per update"):
        node.apply_update({"phi": np.full(node.parameters["phi"].shape, 1.0)})


# ---------------------------------------------------------------------------- bad input
def test_unknown_preset_names_choices():
    with pytest.raises(ConfigError, match="'silicon'; choose one of default, silicon-photonic, ideal"):
        mzi_preset("silicon")
    with pytest.raises(ConfigError, match="unknown mzi preset 'nope'"):
        get_device("mzi").config("nope")


def test_too_few_modes_raises():
    with pytest.raises(ConfigError, match="needs at least 11 modes, but the chip has n_modes=8"):
        MziNode(10, 3, config=MziConfig(n_modes=8))


def test_fixed_chip_larger_than_layer():
    node = MziNode(3, 2, config=IDEAL.replace(n_modes=8), rng=1)
    assert node.n_modes == 8
    assert node.parameters["theta"].shape == (28,)


def test_build_unitary_wrong_length_names_expected():
    with pytest.raises(ConfigError, match=r"expected shape \(6,\), got \(5,\)"):
        build_unitary(MeshPhases(np.zeros(5), np.zeros(6), np.zeros(4)))


def test_non_finite_phase_raises():
    with pytest.raises(ConfigError, match="phase nan at index 2 is not finite"):
        build_unitary(MeshPhases(np.array([0, 0, np.nan]), np.zeros(3), np.zeros(3)))
    node = MziNode(3, 2, rng=1)
    theta = node.get_parameters()["theta"]
    theta[0] = np.inf
    with pytest.raises(LimitError, match="NaN or infinite"):
        node.set_parameters({"theta": theta})


def test_decompose_rejects_bad_matrices():
    with pytest.raises(ConfigError, match=r"square matrix .* got shape \(3, 4\)"):
        decompose(np.zeros((3, 4)))
    with pytest.raises(ConfigError, match="not unitary"):
        decompose(2 * np.eye(3))


def test_wrong_input_shape_names_expected():
    node = MziNode(4, 2, rng=1)
    with pytest.raises(ConfigError, match=r"expected an array of shape \(batch, 4\), got \(2, 5\)"):
        node.forward(np.zeros((2, 5)))


def test_config_rejects_unknown_names():
    with pytest.raises(ConfigError, match="unknown mzi stage"):
        MziConfig().without("heater")
    with pytest.raises(ConfigError, match="unknown mzi setting"):
        MziConfig().replace(phase_bit=8)
    with pytest.raises(ConfigError, match="gradient_method"):
        MziConfig(gradient_method="exact")


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("method", ["adjoint", "perturbation"])
def test_dfa_learns_toy_task(method):
    x, y = toy_blobs(np.random.default_rng(0))
    config = MZI_PRESETS["default"].replace(gradient_method=method)

    def make(n_in, n_out, name, activation, rng):
        return MziNode(n_in, n_out, activation=activation, config=config, rng=rng, name=name)

    initial, final = train_dfa(make, x, y, hidden=4, epochs=15, lr=0.03)
    assert final >= 0.9
    assert final > initial


# ------------------------------------------------------------------------- shared helpers
def test_wrap_phase_matches_numpy():
    values = np.random.default_rng(30).uniform(-20, 20, 500)
    resolution = 2 * np.pi / 64
    expected_continuous = np.mod(values, 2 * np.pi)
    expected_grid = np.mod(np.round(np.mod(values, 2 * np.pi) / resolution), 64) * resolution
    np.testing.assert_allclose(wrap_phase(values, 0.0), expected_continuous, atol=1e-12)
    np.testing.assert_allclose(wrap_phase(values, resolution), expected_grid, atol=1e-12)
    assert np.all(wrap_phase(values, resolution) < 2 * np.pi)


@pytest.mark.parametrize("activation", ["linear", "tanh", "hardtanh", "sigmoid"])
def test_activation_matches_reference(activation):
    node = MziNode(4, 3, config=IDEAL, rng=31, activation=activation)
    y = node.forward(np.random.default_rng(32).uniform(-1, 1, (5, 4)))
    a = node.measure_state().probes["preactivation"]
    np.testing.assert_allclose(y, get_activation(activation).f(a), atol=1e-12)


def test_hadamard_codes_are_orthogonal():
    codes = perturbation_codes(13, None, np.random.default_rng(0))
    assert codes.shape == (16, 13)
    np.testing.assert_array_equal(codes.T @ codes, 16 * np.eye(13))
    random_codes = perturbation_codes(13, 5, np.random.default_rng(0))
    assert random_codes.shape == (5, 13)
    assert set(np.unique(random_codes)) == {-1.0, 1.0}


@pytest.mark.parametrize("at", ["output", "preactivation"])
def test_fused_perturbation_matches_python_loop(at):
    from pnn.simulators._optics import OpticalNode

    config = MZI_PRESETS["default"].replace(gradient_method="perturbation", perturbation_samples=6)
    x = np.random.default_rng(33).uniform(-1, 1, (5, 4))
    error = np.random.default_rng(34).standard_normal((5, 3))
    results = []
    for estimate in (MziNode._perturbation_estimate, OpticalNode._perturbation_estimate):
        node = MziNode(4, 3, config=config, rng=35)
        node.forward(x)
        state = node.measure_state()
        # Bind the estimator under test, so both runs share every other step and random draw.
        node._perturbation_estimate = estimate.__get__(node)
        results.append(node.local_gradient(state, error, at=at))
    for name in ("theta", "phi"):
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-9, atol=1e-12)
