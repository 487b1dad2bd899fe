"""Crossbar device physics (pulses, variation, drift, stuck devices) against slow references."""

from __future__ import annotations

import numpy as np
import pytest

from pnn.simulators import _crossbar_kernels as kernels
from pnn.simulators.crossbar import CROSSBAR_PRESETS, STAGES, CrossbarConfig, CrossbarNode

PULSE_STAGES = ("update_nonlinearity", "update_asymmetry", "device_variation", "cycle_variation", "stuck_devices")

SETTINGS = {
    "update_nonlinearity": {"update_nonlinearity": 0.6},
    "update_asymmetry": {"update_asymmetry": 0.3},
    "device_variation": {"g_max_dtod": 0.1, "step_dtod": 0.2},
    "cycle_variation": {"step_std": 0.3},
    "stuck_devices": {"stuck_fraction": 0.2},
    "drift": {"drift_nu": 0.05},
}


def only(stage: str, **extra) -> CrossbarConfig:
    """Default preset with one programming stage on (plus the levels) and the rest off."""
    off = [s for s in STAGES if s not in (stage, "conductance_levels")]
    return CrossbarConfig(**SETTINGS.get(stage, {}), **extra).without(*off)


# ------------------------------------------------------------------------ slow reference
def reference_pulse(g, g_min, g_top, step, up, nonlinearity, asymmetry, cycle_std, rng):
    x = (g - g_min) / (g_top - g_min)
    size = step * (1 - nonlinearity * x) if up else step * (1 + asymmetry) * (1 - nonlinearity * (1 - x))
    if cycle_std > 0:
        size *= 1 + cycle_std * rng.standard_normal()
    size = max(size, 0.0)
    return min(max(g + size if up else g - size, g_min), g_top)


def reference_move(g, row, i, pulses, up, g_min, g_top, step, stuck, nl, asym, std, rng):
    if stuck[row, i]:
        return
    whole = int(np.floor(pulses))
    for _ in range(whole):
        g[row, i] = reference_pulse(g[row, i], g_min, g_top[row, i], step[row, i], up, nl, asym, std, rng)
    rest = pulses - whole
    if rest > 0:
        g[row, i] = reference_pulse(g[row, i], g_min, g_top[row, i], rest * step[row, i], up, nl, asym, std, rng)


def reference_program(g, counts, g_min, g_top, step, stuck, potentiate_only, nl, asym, std, rng):
    """Pulse-by-pulse programming written as plainly as possible; returns the refresh count."""
    refreshes = 0
    for i, c in enumerate(counts):
        if c == 0:
            continue
        plus, minus = (0, 1) if c > 0 else (1, 0)
        if not potentiate_only:
            down = min(abs(c), (g[minus, i] - g_min) / step[minus, i])
            if down > 0:
                reference_move(g, minus, i, down, False, g_min, g_top, step, stuck, nl, asym, std, rng)
            if abs(c) - down > 0:
                reference_move(g, plus, i, abs(c) - down, True, g_min, g_top, step, stuck, nl, asym, std, rng)
        else:
            reference_move(g, plus, i, abs(c), True, g_min, g_top, step, stuck, nl, asym, std, rng)
            full = g[0, i] >= g_top[0, i] - 0.5 * step[0, i] or g[1, i] >= g_top[1, i] - 0.5 * step[1, i]
            if full and not stuck[0, i] and not stuck[1, i]:
                diff = g[0, i] - g[1, i]
                g[:, i] = g_min
                row = 0 if diff >= 0 else 1
                reference_move(g, row, i, abs(diff) / step[row, i], True, g_min, g_top, step, stuck, nl, 0.0, std, rng)
                refreshes += 1
    return refreshes


@pytest.mark.parametrize("potentiate_only", [False, True])
@pytest.mark.parametrize("stage", ["none", *PULSE_STAGES])
def test_pulse_kernel_matches_reference(stage, potentiate_only):
    rng = np.random.default_rng(7)
    n, g_min, g_max = 300, 0.1, 25.0
    level = (g_max - g_min) / 63
    g = g_min + rng.uniform(0, 10, (2, n))
    g_top = np.full((2, n), g_max)
    step = np.full((2, n), level)
    stuck = np.zeros((2, n), dtype=np.int8)
    nl = asym = std = 0.0
    if stage == "update_nonlinearity":
        nl = 0.6
    elif stage == "update_asymmetry":
        asym = 0.3
    elif stage == "device_variation":
        g_top = g_max * (1 + 0.1 * rng.standard_normal((2, n)))
        step = level * (1 + 0.2 * rng.standard_normal((2, n)))
    elif stage == "cycle_variation":
        std = 0.3
    elif stage == "stuck_devices":
        stuck[rng.random((2, n)) < 0.2] = kernels.STUCK_LOW
    counts = np.round(rng.normal(0, 6, n))
    counts[::7] += 0.4  # fractional counts, as the continuous mode sends

    expected = g.copy()
    ref_refreshes = reference_program(
        expected, counts, g_min, g_top, step, stuck, potentiate_only, nl, asym, std, np.random.default_rng(3)
    )
    got = g.copy()
    refreshes = np.zeros(1, dtype=np.int64)
    scheme = kernels.SCHEME_POTENTIATE_ONLY if potentiate_only else kernels.SCHEME_BIDIRECTIONAL
    applied = kernels.program_pulses_kernel(
        got, counts, g_min, g_top, step, stuck, scheme, nl, asym, std,
        np.zeros((2, n)), 0.0, refreshes, np.random.default_rng(3),
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(applied, (got[0] - got[1]) - (g[0] - g[1]), atol=1e-12)
    assert refreshes[0] == ref_refreshes


def test_nonlinear_steps_shrink_near_bound():
    node = CrossbarNode(1, 1, config=only("update_nonlinearity"), rng=0, init_scale=0.0)
    step = node.parameters["weight"].resolution
    # A hair over one level, so that rounding never leaves the buffer just short of a pulse.
    request = np.full((1, 1), step * (1 + 1e-6))
    sizes = [node.apply_update({"weight": request})["weight"][0, 0] / step for _ in range(40)]
    assert sizes[0] == pytest.approx(1.0)
    assert all(b < a for a, b in zip(sizes[1:], sizes[2:]))
    assert sizes[-1] < 0.75


def test_asymmetric_depression_is_larger():
    node = CrossbarNode(1, 1, config=only("update_asymmetry"), rng=0, init_scale=0.0)
    step = node.parameters["weight"].resolution
    up = node.apply_update({"weight": np.full((1, 1), 3 * step)})["weight"][0, 0]
    node.apply_update({"weight": np.full((1, 1), 3 * step)})
    down = node.apply_update({"weight": np.full((1, 1), -3 * step)})["weight"][0, 0]
    assert up == pytest.approx(3 * step)
    assert -down == pytest.approx(3 * step * 1.3)


def test_stuck_devices_never_move(rng):
    node = CrossbarNode(20, 10, config=only("stuck_devices"), rng=4)
    stuck = node._stuck["weight"] != 0
    assert 0.1 < stuck.mean() < 0.3
    before = node.conductances()["weight"]
    for _ in range(20):
        node.apply_update({"weight": rng.normal(0, 0.1, (10, 20))}, clip=True)
    after = node.conductances()["weight"]
    stuck_plus = stuck[0].reshape(10, 20)
    np.testing.assert_array_equal(after[0][stuck_plus], before[0][stuck_plus])
    assert not np.array_equal(after[0][~stuck_plus], before[0][~stuck_plus])


def test_device_variation_is_seeded():
    a = CrossbarNode(8, 4, config=only("device_variation"), rng=9)
    b = CrossbarNode(8, 4, config=only("device_variation"), rng=9)
    np.testing.assert_array_equal(a._g_top["weight"], b._g_top["weight"])
    assert np.std(a._step["weight"]) > 0


def test_drift_follows_power_law():
    cfg = only("drift")
    node = CrossbarNode(6, 3, config=cfg, rng=1, init_scale=3.0)
    g0 = node.conductances()["weight"]
    node.advance_time(1000.0)
    g1 = node.conductances()["weight"]
    factor = ((1000.0 + cfg.t_drift_ref) / cfg.t_drift_ref) ** -cfg.drift_nu
    np.testing.assert_allclose(g1[0], g0[0] * factor, rtol=1e-12)
    np.testing.assert_allclose(node.get_parameters()["weight"], (g1[0] - g1[1]) * node.w_max / node.g_span)


def test_drift_restarts_only_where_programmed():
    node = CrossbarNode(2, 1, config=only("drift"), rng=1, init_scale=0.0)
    node.set_parameters({"weight": np.array([[0.5, 0.5]])})
    node.advance_time(500.0)
    step = node.parameters["weight"].resolution
    node.apply_update({"weight": np.array([[2 * step, 0.0]])})
    node.advance_time(1.0)
    g_plus = node.conductances()["weight"][0][0]
    # The programmed device is young again, so it has drifted less than the untouched one.
    assert g_plus[0] > g_plus[1]


def test_drift_clock_per_batch(rng):
    node = CrossbarNode(4, 2, config=only("drift", t_per_batch=2.0), rng=1)
    node.forward(rng.uniform(-1, 1, (3, 4)))
    node.forward(rng.uniform(-1, 1, (3, 4)))
    assert node.time == 4.0


def test_potentiate_only_refreshes():
    cfg = only("none", programming="potentiate-only")
    node = CrossbarNode(1, 1, config=cfg, rng=0, init_scale=0.0)
    step = node.parameters["weight"].resolution
    for sign in [1, -1] * 40:
        node.apply_update({"weight": np.full((1, 1), sign * 4 * step)}, clip=True)
    assert node.refreshes[0] > 0
    g_plus, g_minus = node.conductances()["weight"]
    assert max(g_plus[0, 0], g_minus[0, 0]) < node.config.g_max
    # Alternating changes cancel, and the refreshes keep the difference they found.
    assert abs(node.get_parameters()["weight"][0, 0]) <= 4 * step + 1e-9


def test_pcm_preset_trains_a_little(rng):
    node = CrossbarNode(4, 2, config=CROSSBAR_PRESETS["pcm"], rng=2, activation="linear")
    x = rng.uniform(-1, 1, (64, 4))
    target = x[:, :2] * 0.5
    first = None
    for _ in range(200):
        y = node.forward(x)
        error = y - target
        loss = float((error**2).mean())
        first = loss if first is None else first
        grads = node.local_gradient(node.measure_state(), error)
        node.apply_update({k: -0.05 * v for k, v in grads.items()}, clip=True)
    assert loss < 0.5 * first


def test_state_dict_keeps_device_physics(rng):
    node = CrossbarNode(5, 3, config=CROSSBAR_PRESETS["pcm"], rng=2)
    node.apply_update({"weight": rng.normal(0, 0.05, (3, 5))}, clip=True)
    saved = node.state_dict()
    x = rng.uniform(-1, 1, (4, 5))
    expected = node.forward(x)
    node.apply_update({"weight": rng.normal(0, 0.05, (3, 5))}, clip=True)
    node.advance_time(10.0)
    node.load_state_dict(saved)
    np.testing.assert_array_equal(node.forward(x), expected)
