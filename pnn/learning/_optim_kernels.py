"""Numba kernels of the optimizers: one pass over each parameter array, float64 throughout.

The optimizers in :mod:`pnn.learning.optim` call these; tests compare them with the textbook
NumPy formulas.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def adam_kernel(grad, m, v, params, lr, beta1, beta2, eps, correction1, correction2, weight_decay):
    """Update the moments m and v in place and return the Adam step, all flat float64 arrays.

    ``params`` is only read when ``weight_decay`` is non-zero (decoupled decay, as in AdamW).
    """
    out = np.empty_like(grad)
    for i in range(grad.size):
        g = grad[i]
        m[i] = beta1 * m[i] + (1.0 - beta1) * g
        v[i] = beta2 * v[i] + (1.0 - beta2) * g * g
        step = -lr * (m[i] / correction1) / (np.sqrt(v[i] / correction2) + eps)
        if weight_decay != 0.0:
            step -= lr * weight_decay * params[i]
        out[i] = step
    return out


@njit(cache=True)
def momentum_kernel(grad, velocity, params, lr, momentum, weight_decay, first):
    """Update the velocity in place and return the SGD step, all flat float64 arrays."""
    out = np.empty_like(grad)
    for i in range(grad.size):
        g = grad[i]
        if weight_decay != 0.0:
            g += weight_decay * params[i]
        if momentum != 0.0:
            velocity[i] = g if first else momentum * velocity[i] + g
            g = velocity[i]
        out[i] = -lr * g
    return out
