"""Numba kernels of the resistive network: the batched Newton solve and the adjoint solve.

Units inside the kernels are volts, microsiemens and microamperes, so conductance times voltage
gives a current with no conversion factor. Every array is float64: the diode exponentials and
the Kirchhoff residual (checked to 1e-15 A) need double precision.

Layout shared with :mod:`pnn.simulators.resistive`. The free (unknown) node voltages of all
layers sit in one vector: layer ``l`` has ``sizes[l]`` nodes starting at ``node_offset[l]``. The
conductances of layer ``l`` form a matrix of shape ``(sizes[l], n_columns[l])`` stored row by row
in one flat array from ``g_offset[l]``. Its columns are the nodes that layer ``l`` connects to:

- layer 0: the input sources ``x`` (n_in columns), their negated copies ``-x`` (n_in columns),
  then the bias sources ``+v_bias`` and ``-v_bias``;
- layer l > 0: the free nodes of layer ``l - 1``, then ``+v_bias`` and ``-v_bias``.

Nodes of one layer are not connected to each other, so the Jacobian of Kirchhoff's current law
is block tridiagonal with diagonal blocks that are themselves diagonal. The solve eliminates the
layers in order (block Gaussian elimination): the first layer's Schur complement is diagonal,
and every later one is a dense symmetric positive definite matrix of that layer's size, factored
by Cholesky. A one-layer network therefore costs O(number of conductances) per Newton step.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

#: Fast-math flags of every kernel here: reassociation lets the compiler vectorize the sums of
#: the residual and the Schur complements. The flags that assume no NaN or infinity stay off,
#: because a NaN voltage marks an example that did not converge.
FASTMATH = {"reassoc", "contract"}

#: Exponent above which the diode law continues linearly, so that a wild Newton trial cannot
#: overflow. At the default diode settings this is reached only above about 3.5 V, where the
#: current would exceed 1e25 A, so it never changes a physical solution.
EXP_LIMIT = 80.0


@njit(cache=True, fastmath=FASTMATH)
def _limited_exp(a):
    """Return exp(a) and its derivative, continued linearly above EXP_LIMIT."""
    if a > EXP_LIMIT:
        top = math.exp(EXP_LIMIT)
        return top * (1.0 + a - EXP_LIMIT), top
    value = math.exp(a)
    return value, value


@njit(cache=True, fastmath=FASTMATH)
def diode_pair(v, i_sat, n_vt, v_diode_bias):
    """Return the current (uA) leaving a node through its antiparallel diode pair, and its slope (uS).

    One diode conducts from the node to a source at ``+v_diode_bias``, the other from a source
    at ``-v_diode_bias`` into the node (Shockley law, ``i_sat`` in uA, ``n_vt`` = ideality
    factor times thermal voltage in V).
    """
    up, d_up = _limited_exp((v - v_diode_bias) / n_vt)
    down, d_down = _limited_exp((-v - v_diode_bias) / n_vt)
    current = i_sat * (up - down)
    slope = i_sat / n_vt * (d_up + d_down)
    return current, slope


@njit(cache=True, fastmath=FASTMATH)
def _source_weights(g, sizes, g_offset, n_columns, n_in, v_bias):
    """Return how the sources drive the first layer, and the bias current into every node.

    Returns
    -------
    input_weight : array of shape (sizes[0], n_in), in uS
        ``G(+x_j) - G(-x_j)`` per first-layer node: the current drawn from the inputs is
        ``input_weight @ x``.
    bias_drive : array of shape (n_free,), in uA
        ``v_bias * (G(+v_bias) - G(-v_bias))`` per node.
    """
    n_free = 0
    for layer in range(sizes.size):
        n_free += sizes[layer]
    input_weight = np.empty((sizes[0], n_in))
    bias_drive = np.empty(n_free)
    node = 0
    for layer in range(sizes.size):
        n_prev = 2 * n_in if layer == 0 else sizes[layer - 1]
        width = n_columns[layer]
        for i in range(sizes[layer]):
            row = g_offset[layer] + i * width
            if layer == 0:
                for j in range(n_in):
                    input_weight[i, j] = g[row + j] - g[row + n_in + j]
            bias_drive[node] = v_bias * (g[row + n_prev] - g[row + n_prev + 1])
            node += 1
    return input_weight, bias_drive


@njit(cache=True, fastmath=FASTMATH)
def _drive(x, input_weight, bias_drive, inject, drive):
    """Fill ``drive`` with the current the sources and the injection push into each node (uA)."""
    for n in range(drive.size):
        drive[n] = bias_drive[n] + inject[n]
    for i in range(input_weight.shape[0]):
        s = 0.0
        for j in range(x.size):
            s += input_weight[i, j] * x[j]
        drive[i] += s


@njit(cache=True, fastmath=FASTMATH)
def _residual(v, drive, static, g, sizes, node_offset, g_offset, n_columns,
              has_diode, i_sat, n_vt, v_diode_bias, f):
    """Fill ``f`` with the net current leaving each free node (uA); return sum(f**2).

    Kirchhoff's law at node p: ``static[p] * v[p] - drive[p]`` minus the currents from the
    free nodes of the neighbouring layers, plus the diode current.
    """
    n_free = f.size
    for n in range(n_free):
        f[n] = static[n] * v[n] - drive[n]
    for layer in range(1, sizes.size):
        n_prev = sizes[layer - 1]
        prev_offset = node_offset[layer - 1]
        width = n_columns[layer]
        for k in range(sizes[layer]):
            node = node_offset[layer] + k
            row = g_offset[layer] + k * width
            vk = v[node]
            coupled = 0.0
            for j in range(n_prev):
                w = g[row + j]
                coupled += w * v[prev_offset + j]
                f[prev_offset + j] -= w * vk
            f[node] -= coupled
    merit = 0.0
    for n in range(n_free):
        if has_diode[n]:
            current, _ = diode_pair(v[n], i_sat, n_vt, v_diode_bias)
            f[n] += current
        merit += f[n] * f[n]
    return merit


@njit(cache=True, fastmath=FASTMATH)
def static_diagonal(g, sizes, node_offset, g_offset, n_columns, n_in):
    """Return the conductance sum at every free node (uS): the Jacobian diagonal without diodes."""
    n_free = node_offset[-1] + sizes[-1]
    diagonal = np.zeros(n_free)
    for layer in range(sizes.size):
        n_prev = 2 * n_in if layer == 0 else sizes[layer - 1]
        width = n_columns[layer]
        for i in range(sizes[layer]):
            row = g_offset[layer] + i * width
            for j in range(width):
                diagonal[node_offset[layer] + i] += g[row + j]
                if layer > 0 and j < n_prev:
                    diagonal[node_offset[layer - 1] + j] += g[row + j]
    return diagonal


@njit(cache=True, fastmath=FASTMATH)
def _cholesky(a, offset, n):
    """Factor the symmetric matrix a[offset:offset + n*n] (lower triangle read) in place."""
    for j in range(n):
        s = a[offset + j * n + j]
        for k in range(j):
            s -= a[offset + j * n + k] ** 2
        if not s > 0.0:
            return False
        root = math.sqrt(s)
        a[offset + j * n + j] = root
        for i in range(j + 1, n):
            s = a[offset + i * n + j]
            for k in range(j):
                s -= a[offset + i * n + k] * a[offset + j * n + k]
            a[offset + i * n + j] = s / root
    return True


@njit(cache=True, fastmath=FASTMATH)
def _cholesky_solve(a, offset, n, b, b_offset):
    """Solve L L^T y = b in place on b[b_offset:b_offset + n], with L from :func:`_cholesky`."""
    for i in range(n):
        s = b[b_offset + i]
        for k in range(i):
            s -= a[offset + i * n + k] * b[b_offset + k]
        b[b_offset + i] = s / a[offset + i * n + i]
    for i in range(n - 1, -1, -1):
        s = b[b_offset + i]
        for k in range(i + 1, n):
            s -= a[offset + k * n + i] * b[b_offset + k]
        b[b_offset + i] = s / a[offset + i * n + i]


@njit(cache=True, fastmath=FASTMATH)
def _factor(g, sizes, node_offset, g_offset, n_columns, diagonal, schur, schur_offset, work):
    """Eliminate the layers in order and factor each Schur complement; False if one is not SPD.

    ``diagonal`` is the full Jacobian diagonal. Layer 0's complement is ``diagonal`` itself;
    layer l > 0 gets ``S_l = diag(d_l) - W_l S_{l-1}^{-1} W_l^T`` in ``schur`` (Cholesky factor),
    where ``W_l`` is the first ``sizes[l-1]`` columns of that layer's conductances.
    ``work`` has room for at least max(sizes[l-1] * sizes[l]) numbers.
    """
    for layer in range(1, sizes.size):
        n_prev = sizes[layer - 1]
        n_here = sizes[layer]
        width = n_columns[layer]
        row0 = g_offset[layer]
        base = schur_offset[layer]
        prev_nodes = node_offset[layer - 1]
        here_nodes = node_offset[layer]
        # Row k of `scaled` is S_{l-1}^{-1} W_l[k, :]; S_0 is diagonal.
        weights = g[row0 : row0 + n_here * width].reshape(n_here, width)
        scaled = work[: n_here * n_prev].reshape(n_here, n_prev)
        for k in range(n_here):
            for i in range(n_prev):
                scaled[k, i] = weights[k, i]
            if layer == 1:
                for i in range(n_prev):
                    scaled[k, i] /= diagonal[prev_nodes + i]
            else:
                _cholesky_solve(schur, schur_offset[layer - 1], n_prev, work, k * n_prev)
        for k in range(n_here):
            for k2 in range(k + 1):
                s = 0.0
                for i in range(n_prev):
                    s += weights[k, i] * scaled[k2, i]
                schur[base + k * n_here + k2] = -s
        for k in range(n_here):
            schur[base + k * n_here + k] += diagonal[here_nodes + k]
        if not _cholesky(schur, base, n_here):
            return False
    return True


@njit(cache=True, fastmath=FASTMATH)
def _apply_inverse(layer, diagonal, node_offset, sizes, schur, schur_offset, b, b_offset):
    """Overwrite b[b_offset:b_offset + sizes[layer]] with the layer's Schur complement inverse times it."""
    if layer == 0:
        for i in range(sizes[0]):
            b[b_offset + i] /= diagonal[node_offset[0] + i]
    else:
        _cholesky_solve(schur, schur_offset[layer], sizes[layer], b, b_offset)


@njit(cache=True, fastmath=FASTMATH)
def _solve(g, sizes, node_offset, g_offset, n_columns, diagonal, schur, schur_offset, rhs, z, scratch):
    """Solve J z = rhs with the factors from :func:`_factor`; ``scratch`` has max(sizes) numbers."""
    n_layers = sizes.size
    for n in range(rhs.size):
        z[n] = rhs[n]

    # Forward sweep: y_l = rhs_l + W_l S_{l-1}^{-1} y_{l-1}, kept in z.
    for layer in range(1, n_layers):
        n_prev = sizes[layer - 1]
        prev_nodes = node_offset[layer - 1]
        for i in range(n_prev):
            scratch[i] = z[prev_nodes + i]
        _apply_inverse(layer - 1, diagonal, node_offset, sizes, schur, schur_offset, scratch, 0)
        width = n_columns[layer]
        row0 = g_offset[layer]
        for k in range(sizes[layer]):
            s = 0.0
            for i in range(n_prev):
                s += g[row0 + k * width + i] * scratch[i]
            z[node_offset[layer] + k] += s

    # Backward sweep: z_L = S_L^{-1} y_L, then z_l = S_l^{-1} (y_l + W_{l+1}^T z_{l+1}).
    last = n_layers - 1
    _apply_inverse(last, diagonal, node_offset, sizes, schur, schur_offset, z, node_offset[last])
    for layer in range(n_layers - 2, -1, -1):
        n_next = sizes[layer + 1]
        width = n_columns[layer + 1]
        row0 = g_offset[layer + 1]
        here = node_offset[layer]
        for i in range(sizes[layer]):
            s = 0.0
            for k in range(n_next):
                s += g[row0 + k * width + i] * z[node_offset[layer + 1] + k]
            z[here + i] += s
        _apply_inverse(layer, diagonal, node_offset, sizes, schur, schur_offset, z, here)


@njit(cache=True, fastmath=FASTMATH)
def _jacobian_diagonal(v, static, has_diode, i_sat, n_vt, v_diode_bias, diagonal):
    for n in range(v.size):
        diagonal[n] = static[n]
        if has_diode[n]:
            _, slope = diode_pair(v[n], i_sat, n_vt, v_diode_bias)
            diagonal[n] += slope


@njit(cache=True, fastmath=FASTMATH)
def _buffers(sizes, n_free):
    schur_offset = np.zeros(sizes.size, dtype=np.int64)
    total = 0
    largest_product = 1
    for layer in range(1, sizes.size):
        schur_offset[layer] = total
        total += sizes[layer] * sizes[layer]
        largest_product = max(largest_product, sizes[layer - 1] * sizes[layer])
    schur = np.zeros(max(total, 1))
    work = np.zeros(largest_product)
    scratch = np.zeros(max(n_free, 1))
    return schur, schur_offset, work, scratch


@njit(cache=True, fastmath=FASTMATH)
def settle_kernel(x, v_init, inject, g, sizes, node_offset, g_offset, n_columns, n_in, v_bias,
                  has_diode, i_sat, n_vt, v_diode_bias, tol, max_iter):
    """Solve Kirchhoff's current law for every example by damped Newton iteration.

    Parameters
    ----------
    x : float64 array of shape (batch, n_in)
        Input source voltages, in V.
    v_init : float64 array of shape (batch, n_free)
        Starting node voltages, in V.
    inject : float64 array of shape (batch, n_free)
        Current injected into each free node, in uA.
    g : float64 array
        Conductances of every layer, flat (see the module docstring), in uS.
    tol : float
        Largest absolute Kirchhoff residual at any node of a converged solution, in uA.

    Returns
    -------
    v : float64 array of shape (batch, n_free)
        Node voltages, in V.
    iterations : int64 array of shape (batch,)
    residual : float64 array of shape (batch,)
        Largest absolute Kirchhoff residual at the returned voltages, in uA.
    converged : bool array of shape (batch,)
    """
    batch, n_free = v_init.shape
    static = static_diagonal(g, sizes, node_offset, g_offset, n_columns, n_in)
    input_weight, bias_drive = _source_weights(g, sizes, g_offset, n_columns, n_in, v_bias)
    schur, schur_offset, work, scratch = _buffers(sizes, n_free)
    diagonal = np.empty(n_free)
    drive = np.empty(n_free)
    f = np.empty(n_free)
    f_trial = np.empty(n_free)
    step = np.empty(n_free)
    v_trial = np.empty(n_free)

    v_out = np.empty((batch, n_free))
    iterations = np.zeros(batch, dtype=np.int64)
    residual = np.empty(batch)
    converged = np.zeros(batch, dtype=np.bool_)
    for b in range(batch):
        v = v_out[b]
        for n in range(n_free):
            v[n] = v_init[b, n]
        _drive(x[b], input_weight, bias_drive, inject[b], drive)
        merit = _residual(v, drive, static, g, sizes, node_offset, g_offset, n_columns,
                          has_diode, i_sat, n_vt, v_diode_bias, f)
        for it in range(max_iter + 1):
            largest = 0.0
            for n in range(n_free):
                largest = max(largest, abs(f[n]))
            if largest <= tol:
                converged[b] = True
                break
            if it == max_iter or not math.isfinite(merit):
                break
            iterations[b] = it + 1

            _jacobian_diagonal(v, static, has_diode, i_sat, n_vt, v_diode_bias, diagonal)
            if not _factor(g, sizes, node_offset, g_offset, n_columns, diagonal, schur, schur_offset, work):
                break
            _solve(g, sizes, node_offset, g_offset, n_columns, diagonal, schur, schur_offset, f, step, scratch)

            # Backtracking on ||f||^2: the Newton step is a descent direction for it (slope
            # -2 ||f||^2), so halving the step until the Armijo condition is met always ends,
            # unless rounding already dominates the residual.
            t = 1.0
            accepted = False
            for _ in range(60):
                for n in range(n_free):
                    v_trial[n] = v[n] - t * step[n]
                trial = _residual(v_trial, drive, static, g, sizes, node_offset, g_offset, n_columns,
                                  has_diode, i_sat, n_vt, v_diode_bias, f_trial)
                if trial <= (1.0 - 1e-4 * t) * merit:
                    accepted = True
                    break
                t *= 0.5
            if not accepted:
                break
            for n in range(n_free):
                v[n] = v_trial[n]
                f[n] = f_trial[n]
            merit = trial

        largest = 0.0
        for n in range(n_free):
            largest = max(largest, abs(f[n]))
        residual[b] = largest
        converged[b] = largest <= tol
    return v_out, iterations, residual, converged


@njit(cache=True, fastmath=FASTMATH)
def adjoint_kernel(v, rhs, g, sizes, node_offset, g_offset, n_columns, n_in, has_diode, i_sat, n_vt,
                   v_diode_bias):
    """Solve J lambda = rhs per example, with J the Jacobian of Kirchhoff's law at voltages v.

    Parameters
    ----------
    v : float64 array of shape (batch, n_free)
        Node voltages where the network is linearised, in V.
    rhs : float64 array of shape (batch, n_free)
        Loss derivative with respect to each node voltage, in 1/V (or any unit per V).

    Returns
    -------
    float64 array of shape (batch, n_free)
        The adjoint variables, in rhs units per uA. Rows where the Jacobian is not positive
        definite (non-finite voltages) are NaN.
    """
    batch, n_free = v.shape
    static = static_diagonal(g, sizes, node_offset, g_offset, n_columns, n_in)
    schur, schur_offset, work, scratch = _buffers(sizes, n_free)
    diagonal = np.empty(n_free)
    out = np.empty((batch, n_free))
    for b in range(batch):
        _jacobian_diagonal(v[b], static, has_diode, i_sat, n_vt, v_diode_bias, diagonal)
        if not _factor(g, sizes, node_offset, g_offset, n_columns, diagonal, schur, schur_offset, work):
            for n in range(n_free):
                out[b, n] = np.nan
            continue
        _solve(g, sizes, node_offset, g_offset, n_columns, diagonal, schur, schur_offset, rhs[b], out[b], scratch)
    return out
