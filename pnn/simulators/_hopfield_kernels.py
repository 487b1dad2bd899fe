"""Numba kernel of the layered Hopfield network: synchronous settling by projected gradient descent.

Every array is float64, so that equilibrium propagation's difference of two nearby states,
divided by a small nudge strength, keeps its precision.

Layout shared with :mod:`pnn.simulators.hopfield`. The states of the free units of all layers
sit in one array of shape (n_free, batch): unit-major, so that each layer's rows form a
C-contiguous block that BLAS multiplies without a copy. Layer ``l`` has ``sizes[l]`` units from
row ``unit_offset[l]``. Its weights form a matrix of shape (sizes[l], fan_in), fan_in being
``n_in`` for the first layer and ``sizes[l - 1]`` after it, stored row by row in one flat array
from ``weight_offset[l]``. The biases of all units sit in one flat array in unit order.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def settle_kernel(input_drive, state, force, weights, biases, sizes, unit_offset, weight_offset, step, iterations):
    """Run ``iterations`` steps of ``s <- clip(s - step * dF/ds, 0, 1)`` on every example, in place.

    The energy is ``E = 1/2 sum s^2 - sum b rho(s) - sum_l rho(s_l) . W_l rho(s_{l-1})`` with
    ``rho`` the hard sigmoid ``clip(s, 0, 1)`` and ``rho(s_0)`` the clamped inputs, and the
    total energy is ``F = E - force . rho(s_out)``. States stay in [0, 1], where ``rho(s) = s``
    and ``rho'(s) = 1`` (the bounds included, so that a unit at a bound can leave it), so
    ``dF/ds_l = s_l - drive_l`` with ``drive_l = b_l + W_l s_{l-1} + W_{l+1}^T s_{l+1}``
    (plus ``force`` on the output layer). Every layer is updated from the previous step's states
    (synchronous update, as in Scellier and Bengio 2017, Frontiers in Computational
    Neuroscience 11:24).

    Parameters
    ----------
    input_drive : float64 array of shape (sizes[0], batch)
        ``W_1 x`` for the clamped inputs x, one column per example. The caller computes it once
        per batch, because it is the largest product of a settle and the same in every phase.
    state : float64 array of shape (n_free, batch)
        Starting states in [0, 1]; overwritten with the states after the last step.
    force : float64 array of shape (sizes[-1], batch)
        Nudging force on the output units, ``-beta * dLoss/ds_out``; zeros for the free phase.
    weights, biases : float64 arrays
        Flat weights and biases (see the module docstring).
    step : float
        Step size of the gradient descent, in (0, 1].
    iterations : int
        Number of steps.
    """
    n_layers = sizes.size
    n_free, batch = state.shape
    out_start = unit_offset[n_layers - 1]

    # The clamped inputs, the biases and the force do not change during the settle.
    constant = np.empty((n_free, batch))
    constant[0 : sizes[0]] = input_drive
    for unit in range(sizes[0], n_free):
        for b in range(batch):
            constant[unit, b] = 0.0
    for unit in range(n_free):
        for b in range(batch):
            constant[unit, b] += biases[unit]
    for k in range(sizes[n_layers - 1]):
        for b in range(batch):
            constant[out_start + k, b] += force[k, b]

    drive = np.empty((n_free, batch))
    for _ in range(iterations):
        drive[:, :] = constant
        for layer in range(1, n_layers):
            fan_in = sizes[layer - 1]
            start = weight_offset[layer]
            matrix = weights[start : start + sizes[layer] * fan_in].reshape(sizes[layer], fan_in)
            here = unit_offset[layer]
            below = unit_offset[layer - 1]
            # Bottom-up W_l s_{l-1} and top-down W_l^T s_l: the symmetric coupling of the energy.
            drive[here : here + sizes[layer]] += np.dot(matrix, state[below : below + fan_in])
            drive[below : below + fan_in] += np.dot(matrix.T, state[here : here + sizes[layer]])
        for unit in range(n_free):
            for b in range(batch):
                s = state[unit, b]
                s = s - step * (s - drive[unit, b])
                state[unit, b] = min(max(s, 0.0), 1.0)
