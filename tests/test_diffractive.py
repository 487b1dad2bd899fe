"""Tests of the diffractive simulator: kernels against NumPy, propagation oracles, gradients, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from .optics_helpers import toy_blobs, train_dfa

from pnn.errors import ConfigError, LimitError
from pnn.simulators import get_device
from pnn.simulators.diffractive import (
    DIFFRACTIVE_PRESETS,
    STAGES,
    DiffractiveConfig,
    DiffractiveNode,
    angular_spectrum_transfer,
    diffractive_preset,
    propagate,
)

IDEAL = DIFFRACTIVE_PRESETS["ideal"]


def only(stage: str | None, base: DiffractiveConfig = IDEAL) -> DiffractiveConfig:
    """The ideal preset with one stage switched back on (None: every stage off)."""
    if stage is None:
        return base
    return base.replace(disabled=base.disabled - {stage})


# --------------------------------------------------------------------------- slow reference
def reference_forward(node: DiffractiveNode, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Slow forward pass: one propagation per example, then the camera pixel by pixel."""
    cfg = node.config
    n, m = node.slm_pixels, node.n_grid
    x = np.array(x, dtype=float)
    if cfg.enabled("input_dac"):
        steps = 2 ** (cfg.input_dac_bits - 1) - 1
        x = np.round(x * steps) / steps
    amplitudes = np.concatenate([x, np.full((x.shape[0], cfg.bias_regions), cfg.bias_amplitude)], axis=1)

    pitch = cfg.pixel_pitch_um * 1e-6
    wavelength = cfg.wavelength_nm * 1e-9
    distance = node.distance
    start = (m - n) // 2
    full_scale_power = node.input_masks[: node.n_in].sum() + cfg.bias_amplitude**2 * node.input_masks[node.n_in :].sum()
    reference_intensity = full_scale_power / (n * n)
    electrons_per_unit = cfg.reference_e / reference_intensity
    per_region = cfg.region_pixels**2
    gain = 1.0 if node.activation.upper < np.inf else cfg.logit_gain

    a = np.zeros((x.shape[0], node.n_out))
    for b in range(x.shape[0]):
        slm = np.tensordot(amplitudes[b], node.input_masks.astype(float), axes=1) * np.exp(1j * node.phases["phase"])
        grid = np.zeros((m, m), dtype=complex)
        grid[start : start + n, start : start + n] = slm
        camera = propagate(grid, pitch, wavelength, distance)[start : start + n, start : start + n].ravel()
        sums = np.zeros(2 * node.n_out)
        for r in range(2 * node.n_out):
            for p in node.region_pixels[r]:
                electrons = abs(camera[p]) ** 2 * electrons_per_unit
                if cfg.enabled("shot_noise"):
                    electrons += math.sqrt(electrons) * rng.standard_normal()
                if cfg.enabled("read_noise"):
                    electrons += cfg.read_noise_e * rng.standard_normal()
                if cfg.enabled("saturation"):
                    electrons = min(cfg.full_well_e, max(0.0, electrons))
                if cfg.enabled("quantization"):
                    step = cfg.full_well_e / (2**cfg.bit_depth - 1)
                    electrons = np.round(electrons / step) * step
                sums[r] += electrons
        for j in range(node.n_out):
            a[b, j] = gain * (sums[2 * j] - sums[2 * j + 1]) / (cfg.reference_e * per_region)
    return a, node.activation.f(a)


# ------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("activation", ["tanh", "linear"])
@pytest.mark.parametrize("region_pixels", [1, 2])
@pytest.mark.parametrize("stage", [None, *STAGES])
def test_forward_matches_reference(stage, region_pixels, activation):
    config = only(stage, IDEAL.replace(region_pixels=region_pixels))
    if stage == "saturation":
        config = config.replace(full_well_e=1500.0)
    if stage == "quantization":
        config = config.replace(bit_depth=6)
    node = DiffractiveNode(5, 3, config=config, rng=3, activation=activation)
    x = np.random.default_rng(1).uniform(-1, 1, (4, 5))
    noise_rng = np.random.default_rng()
    noise_rng.bit_generator.state = node.rng.bit_generator.state
    y = node.forward(x)
    a = node.measure_state().probes["preactivation"]
    a_ref, y_ref = reference_forward(node, x, noise_rng)
    np.testing.assert_allclose(a, a_ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-10)


def test_each_stage_changes_output():
    x = np.random.default_rng(2).uniform(-1, 1, (8, 5))
    ideal = DiffractiveNode(5, 3, config=IDEAL, rng=4).forward(x)
    for stage in STAGES:
        config = only(stage)
        if stage == "saturation":
            config = config.replace(full_well_e=1500.0)
        changed = DiffractiveNode(5, 3, config=config, rng=4).forward(x)
        assert not np.array_equal(changed, ideal), stage


def test_regions_are_disjoint_and_inside_window():
    node = DiffractiveNode(12, 7, config=IDEAL.replace(region_pixels=2), rng=0)
    n = node.slm_pixels
    assert np.all(node.input_masks.sum(axis=0) <= 1)
    assert np.all(node.input_masks.reshape(node.input_masks.shape[0], -1).sum(axis=1) >= 4)
    flat = node.region_pixels.ravel()
    assert len(np.unique(flat)) == flat.size
    assert flat.min() >= 0
    assert flat.max() < n * n


# ------------------------------------------------------------------------------- physics
def test_propagation_conserves_power():
    rng = np.random.default_rng(5)
    field = rng.standard_normal((128, 128)) + 1j * rng.standard_normal((128, 128))
    # An 8 um pitch is far above half the wavelength, so every grid frequency propagates.
    out = propagate(field, 8e-6, 633e-9, 0.05)
    power_in = np.sum(np.abs(field) ** 2)
    assert abs(np.sum(np.abs(out) ** 2) - power_in) / power_in < 1e-12


def test_evanescent_components_decay():
    transfer = angular_spectrum_transfer(64, 0.2e-6, 633e-9, 5e-6)
    assert np.abs(transfer).max() <= 1.0 + 1e-12
    assert np.abs(transfer).min() < 1e-3


def test_gaussian_beam_width_matches_analytic():
    wavelength, pitch, n = 633e-9, 4e-6, 512
    waist = 60e-6
    rayleigh = math.pi * waist**2 / wavelength
    coords = (np.arange(n) - n / 2) * pitch
    xx, yy = np.meshgrid(coords, coords)
    field = np.exp(-(xx**2 + yy**2) / waist**2)
    for distance in (0.5 * rayleigh, 2.0 * rayleigh):
        intensity = np.abs(propagate(field, pitch, wavelength, distance)) ** 2
        # For I ~ exp(-2 r^2 / w^2), the second moment along x is w^2 / 4.
        width = 2.0 * math.sqrt(np.sum(xx**2 * intensity) / np.sum(intensity))
        expected = waist * math.sqrt(1 + (distance / rayleigh) ** 2)
        assert abs(width - expected) / expected < 0.01


def test_default_distance_spreads_light_over_window():
    node = DiffractiveNode(12, 7, config=IDEAL, rng=0)
    fields = node.camera_fields()
    # Every output region receives light from every input region.
    region_power = np.abs(fields.reshape(fields.shape[0], -1)[:, node.region_pixels.ravel()]) ** 2
    assert np.all(region_power.max(axis=1) > 0.01 * region_power.max())


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("activation", ["tanh", "linear"])
def test_adjoint_gradient_matches_finite_differences(activation):
    node = DiffractiveNode(4, 3, config=IDEAL, rng=8, activation=activation)
    x = np.random.default_rng(3).uniform(-1, 1, (5, 4))
    node.forward(x)
    state = node.measure_state()
    error = np.random.default_rng(4).standard_normal((5, 3))
    grad = node.local_gradient(state, error)["phase"]
    base = node.get_parameters()["phase"]
    for index in [(0, 0), (3, 5), (7, 7), (10, 2), (15, 15), (8, 12)]:
        plus, minus = base.copy(), base.copy()
        plus[index] += 1e-6
        minus[index] -= 1e-6
        change = np.sum(error * node._measure(state.inputs, {"phase": plus})[1]) - np.sum(
            error * node._measure(state.inputs, {"phase": minus})[1]
        )
        assert abs(grad[index] - change / 2e-6 / 5) < 1e-8


def test_adjoint_input_gradient_matches_finite_differences():
    node = DiffractiveNode(3, 2, config=IDEAL.replace(region_pixels=2), rng=9, activation="sigmoid")
    x = np.random.default_rng(5).uniform(-1, 1, (3, 3))
    node.forward(x)
    state = node.measure_state()
    error = np.random.default_rng(6).standard_normal((3, 2))
    grad_x = node.input_gradient(state, error)
    for b in range(3):
        for k in range(3):
            plus, minus = state.inputs.copy(), state.inputs.copy()
            plus[b, k] += 1e-6
            minus[b, k] -= 1e-6
            change = np.sum(error * node._measure(plus, node.phases)[1]) - np.sum(error * node._measure(minus, node.phases)[1])
            assert abs(grad_x[b, k] - change / 2e-6) < 1e-7


def test_perturbation_gradient_agrees_with_adjoint():
    x = np.random.default_rng(9).uniform(-1, 1, (16, 4))
    error = np.random.default_rng(10).standard_normal((16, 3))
    adjoint = DiffractiveNode(4, 3, config=IDEAL, rng=12)
    perturb = DiffractiveNode(4, 3, config=IDEAL.replace(gradient_method="perturbation"), rng=12)
    adjoint.forward(x)
    perturb.forward(x)
    g_model = adjoint.local_gradient(adjoint.measure_state(), error)["phase"].ravel()
    g_measured = perturb.local_gradient(perturb.measure_state(), error)["phase"].ravel()
    assert g_model @ g_measured / (np.linalg.norm(g_model) * np.linalg.norm(g_measured)) > 0.9
    # The perturbed runs leave the node's own measurement and transfer matrix as they were.
    assert np.array_equal(perturb.forward(x), adjoint.forward(x))


# ------------------------------------------------------------------------- reproducibility
def test_same_seed_bit_identical():
    x = np.random.default_rng(13).uniform(-1, 1, (10, 4))
    results = []
    for _ in range(2):
        config = DIFFRACTIVE_PRESETS["default"].replace(gradient_method="perturbation", perturbation_samples=8)
        node = DiffractiveNode(4, 3, config=config, rng=21)
        y = node.forward(x)
        grad = node.local_gradient(node.measure_state(), np.ones((10, 3)))["phase"]
        results.append((y, grad))
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1])


def test_phase_levels_quantize_mask():
    node = DiffractiveNode(3, 2, rng=1)
    step = 2 * np.pi / 256
    phase = node.get_parameters()["phase"]
    np.testing.assert_allclose(phase / step, np.round(phase / step), atol=1e-9)


# ---------------------------------------------------------------------------- bad input
def test_unknown_preset_names_choices():
    with pytest.raises(ConfigError, match="unknown diffractive preset 'lcos'; choose one of default, slm-camera, ideal"):
        diffractive_preset("lcos")
    with pytest.raises(ConfigError, match="unknown diffractive preset 'nope'"):
        get_device("diffractive").config("nope")


def test_mask_too_small_raises():
    with pytest.raises(ConfigError, match="need a mask of at least 8 x 8 pixels, but slm_pixels=6"):
        DiffractiveNode(12, 7, config=DiffractiveConfig(slm_pixels=6))


def test_non_finite_phase_raises():
    node = DiffractiveNode(3, 2, rng=1)
    phase = node.get_parameters()["phase"]
    phase[2, 3] = np.nan
    with pytest.raises(LimitError, match="NaN or infinite"):
        node.set_parameters({"phase": phase})


def test_wrong_input_shape_names_expected():
    node = DiffractiveNode(4, 2, rng=1)
    with pytest.raises(ConfigError, match=r"expected an array of shape \(batch, 4\), got \(3,\)"):
        node.forward(np.zeros(3))
    with pytest.raises(ConfigError, match=r"propagate: expected a field of shape \(..., n, n\), got \(4, 5\)"):
        propagate(np.zeros((4, 5)), 1e-6, 5e-7, 1e-3)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="unknown diffractive stage"):
        DiffractiveConfig().without("lens")
    with pytest.raises(ConfigError, match="phase_levels must be an integer >= 2, got 1"):
        DiffractiveConfig(phase_levels=1)
    with pytest.raises(ConfigError, match="distance_mm must be a finite number > 0"):
        DiffractiveConfig(distance_mm=float("nan"))


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("method", ["adjoint", "perturbation"])
def test_dfa_learns_toy_task(method):
    x, y = toy_blobs(np.random.default_rng(0))
    # An 8 x 8 mask keeps the perturbation run short: 64 phases need 128 device runs per batch.
    config = DIFFRACTIVE_PRESETS["default"].replace(gradient_method=method, slm_pixels=8)

    def make(n_in, n_out, name, activation, rng):
        return DiffractiveNode(n_in, n_out, activation=activation, config=config, rng=rng, name=name)

    initial, final = train_dfa(make, x, y, hidden=4, epochs=10, lr=0.1)
    assert final >= 0.9
    assert final > initial
