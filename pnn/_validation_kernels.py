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


@njit(cache=True)
def add_check_kernel(values, delta, lower, upper, tolerance):
    """Check ``values + delta`` against ``[lower, upper]`` without writing anything.

    Returns (non-finite changes, targets more than ``tolerance`` outside, the worst such target).
    The counting loop has no branches, so it vectorises; the worst target is looked for only
    when there is one.
    """
    n_bad = 0
    n_range = 0
    low = lower - tolerance
    high = upper + tolerance
    for i in range(delta.size):
        d = delta[i]
        target = values[i] + d
        finite = abs(d) < np.inf
        n_bad += not finite
        n_range += finite & ((target < low) | (target > high))
    worst_target = 0.0
    if n_range:
        for i in range(delta.size):
            target = values[i] + delta[i]
            outside = abs(delta[i]) < np.inf and (target < low or target > high)
            if outside and (worst_target == 0.0 or abs(target) > abs(worst_target)):
                worst_target = target
    return n_bad, n_range, worst_target


@njit(cache=True)
def add_kernel(values, delta, lower, upper, applied):
    """Add ``delta`` to ``values`` in place, clamped to ``[lower, upper]``; return how many clamped.

    ``values`` keeps its dtype (float32 weights round each sum), and ``applied`` receives the
    change each element really made, in float64. Call :func:`add_check_kernel` first: this
    kernel writes as it goes.
    """
    n_clamped = 0
    for i in range(delta.size):
        old = values[i]
        target = old + delta[i]
        if target < lower:
            target = lower
            n_clamped += 1
        elif target > upper:
            target = upper
            n_clamped += 1
        values[i] = target
        applied[i] = np.float64(values[i]) - np.float64(old)
    return n_clamped
