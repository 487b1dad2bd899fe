"""Vectorized NumPy reference of the resistive network's Newton solve, for tests and benchmarks.

It builds the dense nodal-analysis matrices of the network and runs the same damped Newton
iteration as :func:`pnn.simulators.resistive_kernels.settle_kernel` (same line search, same
tolerance), batched with ``numpy.linalg.solve``. It shares no code with the kernels, so an
indexing error in either shows up as a mismatch. Units: V, uS and uA.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .resistive_kernels import EXP_LIMIT

__all__ = ["nodal_matrices", "diode_pair_reference", "reference_settle", "reference_settle_node"]


def nodal_matrices(conductances: Sequence[np.ndarray], n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the nodal matrices A and B of the network's linear part.

    The current leaving the free nodes is ``A @ v - B @ s``, with ``s = [x, -x, +v_bias,
    -v_bias]`` the source voltages.

    Parameters
    ----------
    conductances
        One array per layer, of shape (nodes in the layer, columns), in uS.
    n_in
        Number of inputs.

    Returns
    -------
    A : array of shape (n_free, n_free), in uS
    B : array of shape (n_free, 2 * n_in + 2), in uS
    """
    sizes = [g.shape[0] for g in conductances]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    n_free = int(sum(sizes))
    n_sources = 2 * n_in + 2
    a = np.zeros((n_free, n_free))
    b = np.zeros((n_free, n_sources))
    for layer, g in enumerate(conductances):
        n_prev = 2 * n_in if layer == 0 else sizes[layer - 1]
        for i in range(g.shape[0]):
            p = offsets[layer] + i
            for j in range(g.shape[1]):
                value = g[i, j]
                a[p, p] += value
                if layer > 0 and j < n_prev:
                    q = offsets[layer - 1] + j
                    a[q, q] += value
                    a[p, q] -= value
                    a[q, p] -= value
                else:
                    source = j if j < n_prev else 2 * n_in + (j - n_prev)
                    b[p, source] += value
    return a, b


def diode_pair_reference(v: np.ndarray, i_sat: float, n_vt: float, v_diode_bias: float) -> tuple[np.ndarray, np.ndarray]:
    """Return the antiparallel diode pair's current (uA) and slope (uS) at voltages v (V)."""

    def limited_exp(arg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        capped = np.minimum(arg, EXP_LIMIT)
        value = np.exp(capped)
        linear = np.exp(EXP_LIMIT) * (1.0 + arg - EXP_LIMIT)
        return np.where(arg > EXP_LIMIT, linear, value), value

    up, d_up = limited_exp((v - v_diode_bias) / n_vt)
    down, d_down = limited_exp((-v - v_diode_bias) / n_vt)
    return i_sat * (up - down), i_sat / n_vt * (d_up + d_down)


def reference_settle(
    x: np.ndarray,
    conductances: Sequence[np.ndarray],
    *,
    diode_mask: np.ndarray,
    v_bias: float,
    i_sat: float,
    n_vt: float,
    v_diode_bias: float,
    inject: np.ndarray | None = None,
    v_init: np.ndarray | None = None,
    tol: float = 1e-9,
    max_iter: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Solve the network by damped Newton iteration with dense batched linear algebra.

    Parameters
    ----------
    x
        Input voltages, array of shape (batch, n_in), in V.
    conductances
        One array per layer, in uS (see :func:`nodal_matrices`).
    diode_mask
        True for free nodes with a diode pair, array of shape (n_free,).
    i_sat, n_vt
        Diode saturation current in uA, and ideality factor times thermal voltage in V.
    inject
        Current injected into each free node, array of shape (batch, n_free), in uA.
    tol
        Largest Kirchhoff residual of a converged example, in uA.

    Returns
    -------
    v : array of shape (batch, n_free)
        Node voltages, in V (not NaN-masked).
    converged : bool array of shape (batch,)
    """
    x = np.asarray(x, dtype=np.float64)
    batch, n_in = x.shape
    a, b = nodal_matrices(conductances, n_in)
    n_free = a.shape[0]
    sources = np.concatenate([x, -x, np.full((batch, 1), v_bias), np.full((batch, 1), -v_bias)], axis=1)
    drive = sources @ b.T
    if inject is not None:
        drive = drive + inject
    mask = np.asarray(diode_mask, dtype=bool)

    def residual(v: np.ndarray, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        current, _ = diode_pair_reference(v, i_sat, n_vt, v_diode_bias)
        return v @ a.T - drive[rows] + np.where(mask, current, 0.0)

    v = np.zeros((batch, n_free)) if v_init is None else np.array(v_init, dtype=np.float64)
    f = residual(v)
    merit = np.sum(f * f, axis=1)
    running = np.ones(batch, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore"):
        for iteration in range(max_iter + 1):
            running &= np.max(np.abs(f), axis=1) > tol
            running &= np.isfinite(merit)
            if iteration == max_iter or not running.any():
                break
            rows = np.flatnonzero(running)
            _, slope = diode_pair_reference(v[rows], i_sat, n_vt, v_diode_bias)
            jacobian = a[None, :, :] + np.einsum("bn,nm->bnm", np.where(mask, slope, 0.0), np.eye(n_free))
            step = np.linalg.solve(jacobian, f[rows][:, :, None])[:, :, 0]

            t = np.ones(rows.size)
            pending = np.ones(rows.size, dtype=bool)
            for _ in range(60):
                trial_v = v[rows] - t[:, None] * step
                trial_f = residual(trial_v, rows)
                trial_merit = np.sum(trial_f * trial_f, axis=1)
                accept = pending & (trial_merit <= (1.0 - 1e-4 * t) * merit[rows])
                accepted_rows = rows[accept]
                v[accepted_rows] = trial_v[accept]
                f[accepted_rows] = trial_f[accept]
                merit[accepted_rows] = trial_merit[accept]
                pending &= ~accept
                if not pending.any():
                    break
                t[pending] *= 0.5
            # An example whose line search failed stops where it is, as in the kernel.
            running[rows[pending]] = False
    converged = np.max(np.abs(f), axis=1) <= tol
    return v, converged


def reference_settle_node(node, x: np.ndarray, nudge: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run :func:`reference_settle` on a :class:`~pnn.simulators.resistive.ResistiveNode`'s circuit.

    Uses the node's real conductances (with device variation) and its settings; ``nudge`` is in
    amperes, as for :meth:`ResistiveNode.settle`. Returns exact node voltages (no read noise)
    and the converged flags.
    """
    cfg = node.config
    inject = None if nudge is None else np.asarray(nudge, dtype=np.float64) @ node.output_map * 1e6
    return reference_settle(
        np.asarray(x, dtype=np.float64),
        list(node.physical_conductances().values()),
        diode_mask=node.diode_mask,
        v_bias=cfg.v_bias,
        i_sat=cfg.diode_i_sat * 1e6,
        n_vt=cfg.diode_ideality * cfg.v_thermal,
        v_diode_bias=cfg.v_diode_bias,
        inject=inject,
        tol=cfg.newton_tol * 1e6,
        max_iter=cfg.newton_max_iter,
    )
