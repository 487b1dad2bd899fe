"""Numba kernels of the crossbar simulator.

Signals are float32; conductances, update buffers and device properties are float64. Every
kernel takes its random generator as an argument, so a run is reproducible from its seed.
The public wrapper (:class:`pnn.simulators.crossbar.CrossbarNode`) validates and coerces
arguments before calling these.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Activation codes understood by the readout kernel.
ACTIVATION_CODES = {"linear": 0, "tanh": 1, "hardtanh": 2, "sigmoid": 3}

# Programming schemes understood by the pulse kernel.
SCHEME_BIDIRECTIONAL = 0
SCHEME_POTENTIATE_ONLY = 1

# Stuck-device codes.
FREE, STUCK_LOW, STUCK_HIGH = 0, 1, 2


@njit(cache=True)
def dac_kernel(x, dac_steps):
    """Quantize inputs in [-1, 1] to a signed DAC code; dac_steps = 0 passes them through."""
    out = np.empty_like(x)
    flat_in = x.ravel()
    flat_out = out.ravel()
    for i in range(flat_in.size):
        v = flat_in[i]
        if dac_steps > 0:
            v = np.float32(np.round(v * dac_steps) / dac_steps)
        flat_out[i] = v
    return out


@njit(cache=True)
def readout_kernel(a, bias, noise_sigma, full_scale, saturate, adc_steps, activation, rng):
    """Add bias and read noise, saturate, quantize and apply the nonlinearity, in place on a.

    a : float32 array of shape (batch, n_out), the ideal column sums W x. On return it contains
    the measured pre-activation, and the function returns the nonlinearity's output.
    """
    batch, n_out = a.shape
    y = np.empty_like(a)
    for i in range(batch):
        for j in range(n_out):
            v = a[i, j] + bias[j]
            if noise_sigma > 0:
                v += noise_sigma * rng.standard_normal()
            if saturate:
                if v > full_scale:
                    v = full_scale
                elif v < -full_scale:
                    v = -full_scale
            if adc_steps > 0:
                v = np.round(v / full_scale * adc_steps) / adc_steps * full_scale
            a[i, j] = v
            if activation == 1:
                y[i, j] = np.tanh(v)
            elif activation == 2:
                y[i, j] = min(1.0, max(-1.0, v))
            elif activation == 3:
                y[i, j] = 0.5 * (1.0 + np.tanh(0.5 * v))
            else:
                y[i, j] = v
    return y


@njit(cache=True)
def forward_kernel(x, w, bias, dac_steps, noise_sigma, full_scale, saturate, adc_steps, activation, rng):
    """Full crossbar forward pass; returns (inputs as applied, measured pre-activation, outputs).

    x : float32 (batch, n_in); w : float32 (n_out, n_in) effective weights; bias : float32 (n_out,).
    """
    x_applied = dac_kernel(x, dac_steps)
    a = np.dot(x_applied, w.T)  # (batch, n_out)
    y = readout_kernel(a, bias, noise_sigma, full_scale, saturate, adc_steps, activation, rng)
    return x_applied, a, y


@njit(cache=True)
def pulse_counts_kernel(buffer, request, level_step, max_pulses, mode, rng):
    """Turn requested changes (flat, float64, conductance units) into pulse counts.

    mode 0: continuous (the count may be fractional); 1: add to the buffer and return the whole
    levels it contains, at most ``max_pulses``, keeping the rest; 2: stochastic rounding to
    whole levels.
    """
    counts = np.empty_like(request)
    for i in range(request.size):
        scaled = request[i] / level_step
        if mode == 1:
            buffer[i] += request[i]
            scaled = np.trunc(buffer[i] / level_step)
            # The buffer's remainder can push a full-size request one level past the limit.
            if scaled > max_pulses:
                scaled = max_pulses
            elif scaled < -max_pulses:
                scaled = -max_pulses
            buffer[i] -= scaled * level_step
        elif mode == 2:
            lower = np.floor(scaled)
            if rng.random() < scaled - lower:
                lower += 1.0
            scaled = lower
        counts[i] = scaled
    return counts


@njit(cache=True)
def program_ideal_kernel(g, counts, g_min, g_max, level_step, snap):
    """Program pairs with identical, linear devices: one device of a pair stays at g_min.

    g : float64 (2, n), row 0 the plus devices and row 1 the minus devices. The pair difference
    moves by counts * level_step, saturating at +-(g_max - g_min); with ``snap`` the result sits
    exactly on the level grid. Returns the applied change of the difference.
    """
    span = g_max - g_min
    n = counts.size
    applied = np.empty(n)
    for i in range(n):
        diff = g[0, i] - g[1, i]
        target = diff + counts[i] * level_step
        if target > span:
            target = span
        elif target < -span:
            target = -span
        if snap:
            target = np.round(target / level_step) * level_step
        if target >= 0:
            g[0, i] = g_min + target
            g[1, i] = g_min
        else:
            g[0, i] = g_min
            g[1, i] = g_min - target
        applied[i] = (g[0, i] - g[1, i]) - diff
    return applied


@njit(cache=True)
def _pulse(g, g_min, g_top, step, up, nonlinearity, asymmetry, cycle_std, rng):
    """Return a device's conductance after one pulse (or a fraction of one, through ``step``)."""
    x = (g - g_min) / (g_top - g_min)
    if up:
        size = step * (1.0 - nonlinearity * x)
    else:
        size = step * (1.0 + asymmetry) * (1.0 - nonlinearity * (1.0 - x))
    if cycle_std > 0:
        size *= 1.0 + cycle_std * rng.standard_normal()
    if size < 0:
        size = 0.0
    g = g + size if up else g - size
    if g > g_top:
        g = g_top
    elif g < g_min:
        g = g_min
    return g


@njit(cache=True)
def _move(g, row, i, pulses, up, g_min, g_top, step, stuck, nonlinearity, asymmetry, cycle_std, rng):
    """Apply ``pulses`` (possibly fractional) pulses to device (row, i) unless it is stuck."""
    if stuck[row, i] != 0:
        return
    whole = int(np.floor(pulses))
    for _ in range(whole):
        g[row, i] = _pulse(g[row, i], g_min, g_top[row, i], step[row, i], up, nonlinearity, asymmetry, cycle_std, rng)
    rest = pulses - whole
    if rest > 0:
        g[row, i] = _pulse(g[row, i], g_min, g_top[row, i], rest * step[row, i], up, nonlinearity, asymmetry, cycle_std, rng)


@njit(cache=True)
def program_pulses_kernel(g, counts, g_min, g_top, step, stuck, scheme, nonlinearity, asymmetry,
                          cycle_std, t_prog, now, refreshes, rng):
    """Program pairs pulse by pulse with non-ideal devices; return the applied change.

    g : float64 (2, n) conductances; counts : float64 (n,) signed pulse counts for the pair
    difference; g_top, step : float64 (2, n) each device's saturation conductance and nominal
    pulse size (device-to-device variation); stuck : int8 (2, n); t_prog : float64 (2, n), set to
    ``now`` for every device that receives a pulse; refreshes : int64 (1,) counter.

    Bidirectional scheme: a positive count first depresses the minus device towards g_min, then
    potentiates the plus device (negative counts mirror this). Potentiate-only scheme (phase-change
    memory, where gradual depression is not available): a positive count potentiates the plus
    device, a negative one the minus device; when either device saturates, the pair is refreshed:
    both are reset to g_min and the difference is programmed onto one device again.
    """
    n = counts.size
    applied = np.empty(n)
    for i in range(n):
        before = g[0, i] - g[1, i]
        c = counts[i]
        if c == 0:
            applied[i] = 0.0
            continue
        magnitude = abs(c)
        plus_row = 0 if c > 0 else 1
        minus_row = 1 - plus_row
        if scheme == SCHEME_BIDIRECTIONAL:
            # Depress the opposite device first, as far as it is above g_min.
            room = (g[minus_row, i] - g_min) / step[minus_row, i]
            down = min(magnitude, room)
            if down > 0:
                _move(g, minus_row, i, down, False, g_min, g_top, step, stuck, nonlinearity, asymmetry, cycle_std, rng)
                t_prog[minus_row, i] = now
            up = magnitude - down
            if up > 0:
                _move(g, plus_row, i, up, True, g_min, g_top, step, stuck, nonlinearity, asymmetry, cycle_std, rng)
                t_prog[plus_row, i] = now
        else:
            _move(g, plus_row, i, magnitude, True, g_min, g_top, step, stuck, nonlinearity, asymmetry, cycle_std, rng)
            t_prog[plus_row, i] = now
            saturated = (g[0, i] >= g_top[0, i] - 0.5 * step[0, i]) or (g[1, i] >= g_top[1, i] - 0.5 * step[1, i])
            if saturated and stuck[0, i] == 0 and stuck[1, i] == 0:
                diff = g[0, i] - g[1, i]
                g[0, i] = g_min
                g[1, i] = g_min
                row = 0 if diff >= 0 else 1
                _move(g, row, i, abs(diff) / step[row, i], True, g_min, g_top, step, stuck, nonlinearity, 0.0, cycle_std, rng)
                t_prog[0, i] = now
                t_prog[1, i] = now
                refreshes[0] += 1
        applied[i] = (g[0, i] - g[1, i]) - before
    return applied


@njit(cache=True)
def drifted_kernel(g, t_prog, nu, now, t_ref):
    """Return conductances read at time ``now``: g * ((now - t_prog + t_ref) / t_ref) ** -nu.

    The power law of phase-change memory drift, with the programmed value defined ``t_ref``
    seconds after programming. All arrays float64 of shape (2, n).
    """
    out = np.empty_like(g)
    rows, n = g.shape
    for r in range(rows):
        for i in range(n):
            age = now - t_prog[r, i] + t_ref
            out[r, i] = g[r, i] * (age / t_ref) ** (-nu[r, i])
    return out


@njit(cache=True)
def update_ideal_kernel(g, buffer, weights, weights32, request, scale, level_step, max_pulses, mode,
                        g_min, g_max, snap, rng):
    """Pulse counting and ideal programming in one pass, keeping the weight caches current.

    The fast path of :func:`pulse_counts_kernel` followed by :func:`program_ideal_kernel` for
    identical, linear, drift-free devices. ``request`` is in weight units and ``scale`` converts
    microsiemens to weight units; ``weights`` (float64) and ``weights32`` (float32) are flat
    views of the node's current weights and are updated in place. Returns the applied change in
    weight units.
    """
    span = g_max - g_min
    n = request.size
    applied = np.empty(n)
    for i in range(n):
        wanted = request[i] / scale
        pulses = wanted / level_step
        if mode == 1:
            buffer[i] += wanted
            pulses = np.trunc(buffer[i] / level_step)
            if pulses > max_pulses:
                pulses = max_pulses
            elif pulses < -max_pulses:
                pulses = -max_pulses
            buffer[i] -= pulses * level_step
        elif mode == 2:
            lower = np.floor(pulses)
            if rng.random() < pulses - lower:
                lower += 1.0
            pulses = lower
        if pulses == 0.0:
            applied[i] = 0.0
            continue
        diff = g[0, i] - g[1, i]
        target = diff + pulses * level_step
        if target > span:
            target = span
        elif target < -span:
            target = -span
        if snap:
            target = np.round(target / level_step) * level_step
        if target >= 0:
            g[0, i] = g_min + target
            g[1, i] = g_min
        else:
            g[0, i] = g_min
            g[1, i] = g_min - target
        new_weight = (g[0, i] - g[1, i]) * scale
        applied[i] = new_weight - weights[i]
        weights[i] = new_weight
        weights32[i] = new_weight
    return applied
