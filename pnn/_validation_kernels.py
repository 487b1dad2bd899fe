"""Numba kernel that checks a parameter update against its limits in one pass (float64).

:meth:`pnn.nodes.ParameterSpec.check_update` uses it for parameters with scalar limits, the
common case, so that checking a large weight matrix costs one pass instead of several.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def update_check_kernel(current, delta, lower, upper, max_step, tolerance, clip, out):
    """Write the allowed change of each element into ``out``; return violation counts.

    An element violates the step limit when ``|delta| > max_step`` and the range when
    ``current + delta`` lies more than ``tolerance`` outside ``[lower, upper]``. With ``clip``
    the change is limited to both; without it ``out`` holds the unclipped change (clamped only
    within the tolerance) and the caller raises. Returns (step violations, range violations,
    elements changed by either, worst step, worst target).
    """
    step_limit = max_step * (1.0 + 1e-9)
    n_step = 0
    n_range = 0
    n_changed = 0
    worst_step = 0.0
    worst_target = 0.0
    for i in range(delta.size):
        d = delta[i]
        changed = False
        if abs(d) > step_limit:
            n_step += 1
            if abs(d) > abs(worst_step):
                worst_step = d
            if clip:
                d = max_step if d > 0 else -max_step
                changed = True
        target = current[i] + d
        if target < lower - tolerance or target > upper + tolerance:
            n_range += 1
            if abs(target) > abs(worst_target) or n_range == 1:
                worst_target = target
            changed = True
        if target < lower:
            target = lower
        elif target > upper:
            target = upper
        if changed:
            n_changed += 1
        out[i] = target - current[i]
    return n_step, n_range, n_changed, worst_step, worst_target
