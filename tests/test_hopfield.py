"""Tests of the layered Hopfield network: kernel against a NumPy reference, energy, gradients, errors."""

from __future__ import annotations

import numpy as np
import pytest

from pnn.errors import ConfigError, LimitError
from pnn.nodes import NodeState
from pnn.simulators.hopfield import HopfieldNode

TOPOLOGIES = [(), (5,), (6, 4), (5, 7, 3)]


def reference_settle(node: HopfieldNode, x, iterations, force=None, start=None, step=None):
    """Slow NumPy twin of the settling kernel: one list entry per layer, batch-major arrays."""
    step = node.step if step is None else step
    params = node.get_parameters()
    sizes = [*node.hidden, node.n_out]
    weights = [params[f"weight{l + 1}"] for l in range(len(sizes))]
    biases = [params[f"bias{l + 1}"] for l in range(len(sizes))]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if start is None:
        states = [np.zeros((x.shape[0], n)) for n in sizes]
    else:
        states = [start[:, offsets[l] : offsets[l + 1]].copy() for l in range(len(sizes))]
    for _ in range(iterations):
        updated = []
        for l in range(len(sizes)):
            below = x if l == 0 else states[l - 1]
            drive = biases[l] + below @ weights[l].T
            if l + 1 < len(sizes):
                drive = drive + states[l + 1] @ weights[l + 1]
            if l == len(sizes) - 1 and force is not None:
                drive = drive + force
            gradient = states[l] - drive
            updated.append(np.clip(states[l] - step * gradient, 0.0, 1.0))
        states = updated
    return np.concatenate(states, axis=1)


def implicit_gradient(node: HopfieldNode, x, state, output_error):
    """Independent implicit differentiation: solve the Hessian of E at the equilibrium per example."""
    params = node.get_parameters()
    sizes = [*node.hidden, node.n_out]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n_free = offsets[-1]
    hessian = np.eye(n_free)
    for l in range(1, len(sizes)):
        here = slice(offsets[l], offsets[l + 1])
        below = slice(offsets[l - 1], offsets[l])
        hessian[here, below] -= params[f"weight{l + 1}"]
        hessian[below, here] -= params[f"weight{l + 1}"].T
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    for b in range(x.shape[0]):
        s = state[b]
        inside = np.flatnonzero((s > 0) & (s < 1))
        rhs = np.zeros(n_free)
        rhs[offsets[-2] :] = output_error[b]
        lam = np.zeros(n_free)
        lam[inside] = np.linalg.solve(hessian[np.ix_(inside, inside)], rhs[inside])
        # dLoss/dtheta = -lambda . d(dE/ds)/dtheta, with dE/ds_l = s_l - b_l - W_l s_{l-1} - W_{l+1}^T s_{l+1}.
        for l in range(len(sizes)):
            lam_here = lam[offsets[l] : offsets[l + 1]]
            s_here = s[offsets[l] : offsets[l + 1]]
            s_below = x[b] if l == 0 else s[offsets[l - 1] : offsets[l]]
            lam_below = np.zeros_like(s_below) if l == 0 else lam[offsets[l - 1] : offsets[l]]
            grads[f"weight{l + 1}"] += (np.outer(lam_here, s_below) + np.outer(s_here, lam_below)) / x.shape[0]
            grads[f"bias{l + 1}"] += lam_here / x.shape[0]
    return grads


def interior_node(hidden=(5,), seed=0, n_in=4, n_out=3) -> HopfieldNode:
    """A node whose equilibria lie inside (0, 1): small weights, biases at 0.5."""
    node = HopfieldNode(n_in, n_out, hidden=hidden, rng=seed, init_scale=0.15)
    node.set_parameters({k: np.full(s.shape, 0.5) for k, s in node.parameters.items() if k.startswith("bias")})
    return node


# ----------------------------------------------------------------------------- kernel
@pytest.mark.parametrize("hidden", TOPOLOGIES)
def test_kernel_matches_reference_free(hidden):
    node = HopfieldNode(6, 3, hidden=hidden, rng=1, init_scale=2.0)
    x = np.random.default_rng(2).uniform(0, 1, (7, 6))
    state = node.settle(x, iterations=30)
    np.testing.assert_allclose(state.probes["state"], reference_settle(node, x, 30), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(state.outputs, state.probes["state"][:, -3:])


@pytest.mark.parametrize("hidden", TOPOLOGIES)
def test_kernel_matches_reference_nudged(hidden):
    node = HopfieldNode(6, 3, hidden=hidden, rng=3, init_scale=2.0)
    x = np.random.default_rng(4).uniform(0, 1, (5, 6))
    free = node.settle(x)
    force = np.random.default_rng(5).normal(size=(5, 3))
    nudged = node.settle(x, force, initial=free, iterations=7, step=0.3)
    expected = reference_settle(node, x, 7, force=force, start=free.probes["state"], step=0.3)
    np.testing.assert_allclose(nudged.probes["state"], expected, rtol=0, atol=1e-12)


def test_states_stay_in_unit_box():
    node = HopfieldNode(8, 4, hidden=(10, 6), rng=0, init_scale=5.0)
    x = np.random.default_rng(0).uniform(0, 1, (9, 8))
    state = node.settle(x, 10.0 * np.random.default_rng(1).normal(size=(9, 4)), iterations=50).probes["state"]
    assert np.all(state >= 0.0)
    assert np.all(state <= 1.0)
    assert np.any(state == 0.0)
    assert np.any(state == 1.0)


def test_settling_lowers_energy():
    node = HopfieldNode(8, 4, hidden=(10,), rng=0, init_scale=2.0)
    x = np.random.default_rng(0).uniform(0, 1, (6, 8))
    energies = [node.energy(node.settle(x, iterations=n)) for n in (1, 2, 4, 8, 16, 32)]
    for earlier, later in zip(energies, energies[1:]):
        assert np.all(later <= earlier + 1e-12)
    assert np.all(energies[-1] < energies[0] - 1e-3)


def test_fixed_point_satisfies_equilibrium():
    node = interior_node()
    x = np.random.default_rng(0).uniform(0, 1, (5, 4))
    s = node.settle(x, iterations=300).probes["state"]
    assert np.all((s > 0) & (s < 1))
    # Inside the box the equilibrium is s = drive; one more step must not move it.
    again = node.settle(x, initial=NodeState(x, s[:, -3:], {"state": s}), iterations=1).probes["state"]
    np.testing.assert_allclose(again, s, rtol=0, atol=1e-13)


def test_input_drive_cache_tracks_updates():
    node = HopfieldNode(4, 2, hidden=(3,), rng=0)
    x = np.random.default_rng(0).uniform(0, 1, (3, 4))
    before = node.settle(x).outputs
    node.apply_update({"weight1": np.full((3, 4), 0.5)})
    after = node.settle(x).outputs
    np.testing.assert_allclose(after, reference_settle(node, x, node.iterations)[:, -2:], rtol=0, atol=1e-12)
    assert not np.allclose(before, after)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("hidden", [(5,), (4, 3)])
def test_local_gradient_matches_implicit_reference(hidden):
    node = HopfieldNode(4, 3, hidden=hidden, rng=2, init_scale=3.0)
    x = np.random.default_rng(1).uniform(0, 1, (6, 4))
    node.forward(x)
    state = node.settle(x, iterations=400)
    error = np.random.default_rng(2).normal(size=(6, 3))
    expected = implicit_gradient(node, x, state.probes["state"], error)
    got = node.local_gradient(state, error)
    s = state.probes["state"]
    assert np.any((s == 0) | (s == 1)), "the case should have units at a bound"
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-10, atol=1e-12, err_msg=key)


def test_local_gradient_matches_finite_differences():
    node = interior_node(hidden=(4,))
    x = np.random.default_rng(3).uniform(0, 1, (4, 4))
    targets = np.random.default_rng(4).uniform(0, 1, (4, 3))

    def loss() -> float:
        return float(0.5 * np.mean(np.sum((node.settle(x, iterations=400).outputs - targets) ** 2, axis=1)))

    state = node.settle(x, iterations=400)
    gradient = node.local_gradient(state, state.outputs - targets)
    eps = 1e-6
    for key in ("weight1", "bias1", "weight2", "bias2"):
        base = node.get_parameters()[key]
        numeric = np.zeros_like(base)
        for k in range(base.size):
            for sign in (1, -1):
                trial = base.copy()
                trial.flat[k] += sign * eps
                node.set_parameters({key: trial})
                numeric.flat[k] += sign * loss() / (2 * eps)
        node.set_parameters({key: base})
        np.testing.assert_allclose(gradient[key], numeric, rtol=1e-6, atol=1e-9, err_msg=key)


def test_input_gradient_matches_finite_differences():
    node = interior_node(hidden=(4,))
    x = np.random.default_rng(5).uniform(0.2, 0.8, (3, 4))
    error = np.random.default_rng(6).normal(size=(3, 3))
    state = node.settle(x, iterations=400)
    got = node.input_gradient(state, error)
    eps = 1e-6
    numeric = np.zeros_like(x)
    for j in range(4):
        shifted = x.copy()
        shifted[:, j] += eps
        up = node.settle(shifted, iterations=400).outputs
        shifted[:, j] -= 2 * eps
        down = node.settle(shifted, iterations=400).outputs
        numeric[:, j] = np.sum(error * (up - down), axis=1) / (2 * eps)
    np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-9)


def test_energy_gradient_is_local_products():
    node = HopfieldNode(3, 2, hidden=(4,), rng=0)
    x = np.random.default_rng(0).uniform(0, 1, (5, 3))
    state = node.settle(x)
    s = state.probes["state"]
    got = node.energy_gradient(state)
    np.testing.assert_allclose(got["weight1"], -(s[:, :4].T @ x) / 5, rtol=1e-12)
    np.testing.assert_allclose(got["weight2"], -(s[:, 4:].T @ s[:, :4]) / 5, rtol=1e-12)
    np.testing.assert_allclose(got["bias2"], -s[:, 4:].mean(axis=0), rtol=1e-12)


# ------------------------------------------------------------------------------- errors
def test_bad_settings_raise():
    for kwargs, message in (
        ({"step": 0.0}, "step must be a number in \\(0, 1\\]"),
        ({"step": 1.5}, "step must be a number in \\(0, 1\\]"),
        ({"iterations": 0}, "iterations must be a positive integer"),
        ({"nudged_iterations": 2.5}, "nudged_iterations must be a positive integer"),
        ({"hidden": (3, 0)}, "hidden layer widths"),
        ({"init_scale": -1.0}, "init_scale must be a positive number"),
    ):
        with pytest.raises(ConfigError, match=message):
            HopfieldNode(3, 2, **kwargs)


def test_bad_settle_arguments_raise():
    node = HopfieldNode(3, 2, hidden=(4,), rng=0)
    x = np.full((2, 3), 0.5)
    with pytest.raises(LimitError, match="outside"):
        node.settle(np.full((2, 3), 1.5))
    with pytest.raises(ConfigError, match="force of shape \\(2, 2\\)"):
        node.settle(x, np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="finite force"):
        node.settle(x, np.full((2, 2), np.inf))
    with pytest.raises(ConfigError, match="iterations must be a positive integer"):
        node.settle(x, iterations=0)
    with pytest.raises(ConfigError, match="'state' probe"):
        node.settle(x, initial=NodeState(x, np.zeros((2, 2))))
    with pytest.raises(ConfigError, match="shape \\(2, 6\\)"):
        node.settle(x, initial=NodeState(x, np.zeros((2, 2)), {"state": np.zeros((2, 5))}))
    with pytest.raises(ConfigError, match="inside \\[0, 1\\]"):
        node.settle(x, initial=NodeState(x, np.zeros((2, 2)), {"state": np.full((2, 6), 2.0)}))
