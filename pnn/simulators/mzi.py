"""Simulated interferometer mesh: a rectangular mesh of Mach-Zehnder interferometers (MZIs).

Mesh. N waveguide modes pass through N columns of MZIs. Column ``c`` contains an MZI on every mode
pair (m, m + 1) with ``m % 2 == c % 2``, N (N - 1) / 2 MZIs in all. This is the rectangular
mesh of Clements et al. 2016, "Optimal design for universal multiport interferometers", Optica 3,
1460, which realises any N x N unitary with equal path depth for every mode. One MZI is two
50:50 directional couplers with an internal phase shifter ``theta`` between them and an external
phase shifter ``phi`` on its upper input::

    T(theta, phi) = B . diag(exp(i theta), 1) . B . diag(exp(i phi), 1),   B = [[1, i], [i, 1]] / sqrt(2)
                  = i exp(i theta / 2) [[exp(i phi) sin(theta/2), cos(theta/2)],
                                        [exp(i phi) cos(theta/2), -sin(theta/2)]]

:func:`decompose` finds the phases of a given unitary (Clements's nulling algorithm, rewritten
for this MZI convention, with a final screen of output phases) and :func:`build_unitary`
multiplies them back.

Node. :class:`MziNode` maps n_in inputs to n_out outputs on N = max(n_in + bias_modes,
2 n_out) modes (or the chip's fixed ``n_modes``). Inputs in [-1, 1] set the real field
amplitudes of modes 0..n_in-1 (a push-pull modulator per mode, where a negative value is a pi
phase), ``bias_modes`` modes after them carry constant light of amplitude ``bias_amplitude``,
and the other modes are dark. Output j is a balanced photodetector on modes 2j and 2j + 1::

    a_j = g (P_2j - P_2j+1) / P_ref,   P_ref = P_mode (n_in + bias_modes * bias_amplitude**2) / N

where P_mode is the power of one mode at full-scale input, so P_ref is the mean power per mode
with every input at full scale, and the node's output is ``f(a_j)`` for its nonlinearity f. The
readout gain g is 1 for a bounded f and ``logit_gain`` for ``linear`` (an output layer). With
the bias light, ``a`` is a constant plus a linear plus a quadratic function of the inputs, so a
layer of these nodes acts like a dense layer with a bias and a mild quadratic nonlinearity. A
hidden node needs a bounded nonlinearity (tanh, hardtanh or sigmoid) to keep its outputs inside
the next node's input range.

Imperfections, in signal order (each a named stage, see :data:`STAGES`):

1. ``input_dac``: the input modulators are driven by DACs with ``input_dac_bits`` bits.
2. ``phase_resolution``: every phase shifter is set by a DAC with ``phase_bits`` bits over
   [0, 2 pi) (the phase parameters are quantized to that grid).
3. ``crosstalk``: heat from one phase shifter shifts the phase of the same kind of shifter in the
   vertically adjacent MZIs of its column by ``crosstalk`` times its own phase.
4. ``splitter_error``: each coupler's splitting angle deviates from pi/4 by a fixed random amount
   with standard deviation ``splitter_error_dtod`` (drawn once per device).
5. ``loss``: each MZI attenuates both arms by ``loss_db`` plus a fixed random spread with standard
   deviation ``loss_db_dtod`` (drawn once per device).
6. ``shot_noise``: shot noise of the two photocurrents, with bandwidth ``bandwidth_ghz``.
7. ``dark_noise``: shot noise of the detectors' dark current; the mean dark current cancels in
   the balanced pair.
8. ``saturation``: the readout saturates at +-``adc_full_scale`` (in units of a).
9. ``adc``: the readout is quantized with ``adc_bits`` bits over that range.

With every stage off, the node is the ideal model: a lossless unitary mesh with noise-free
detection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit

from ..errors import ConfigError
from ..nodes import ParameterSpec
from ._optics import (
    FLOAT,
    TWO_PI,
    OpticalNode,
    StageConfigMixin,
    _activate,
    check_bits,
    check_positive,
    phase_spec,
)

__all__ = [
    "MziConfig",
    "MziNode",
    "MeshPhases",
    "STAGES",
    "MZI_PRESETS",
    "mzi_preset",
    "mesh_layout",
    "decompose",
    "build_unitary",
]

#: Imperfection stages of the mesh, in signal order, each switched off by :meth:`MziConfig.without`.
STAGES = (
    "input_dac",
    "phase_resolution",
    "crosstalk",
    "splitter_error",
    "loss",
    "shot_noise",
    "dark_noise",
    "saturation",
    "adc",
)

#: Elementary charge in coulombs, for shot noise.
ELEMENTARY_CHARGE = 1.602176634e-19


@dataclass(frozen=True)
class MziConfig(StageConfigMixin):
    """Device and periphery settings of a simulated MZI mesh."""

    _stages = STAGES
    _owner = "mzi"

    n_modes: int | None = None
    """Number of waveguide modes of the chip; None sizes the mesh to the layer,
    max(n_in + bias_modes, 2 n_out). A layer that needs more modes than this raises."""
    phase_bits: int = 12
    """Resolution of each phase shifter's DAC over [0, 2 pi), in bits (``phase_resolution``)."""
    max_phase_step: float = math.pi / 4
    """Largest change of one phase per update, in rad."""
    crosstalk: float = 0.005
    """Phase induced on each same-kind shifter of the vertically adjacent MZIs in a column,
    relative to the aggressor's phase (``crosstalk``). The default is a residual after the
    controller compensates the measured crosstalk matrix; uncompensated heaters show a few
    percent."""
    splitter_error_dtod: float = 0.02
    """Device-to-device standard deviation of each coupler's splitting angle around pi/4, in rad
    (``splitter_error``); 0.02 rad moves the power splitting ratio by about 2 %."""
    loss_db: float = 0.2
    """Insertion loss of one MZI, in dB (``loss``)."""
    loss_db_dtod: float = 0.05
    """Device-to-device standard deviation of the MZI insertion loss, in dB (``loss``)."""
    input_dac_bits: int = 8
    """Resolution of the input modulators' DACs, in bits including sign (``input_dac``)."""
    bias_modes: int = 1
    """Number of modes carrying constant bias light."""
    bias_amplitude: float = 1.0
    """Field amplitude of each bias mode, relative to a full-scale input."""
    power_mw: float = 0.1
    """Optical power of one mode at full-scale input, in mW."""
    responsivity_a_per_w: float = 1.0
    """Photodiode responsivity, in A/W."""
    dark_current_na: float = 10.0
    """Dark current of one photodiode, in nA (``dark_noise``)."""
    bandwidth_ghz: float = 10.0
    """Detection bandwidth, in GHz; sets the shot-noise power."""
    adc_bits: int = 8
    """Resolution of the readout ADC, in bits including sign (``adc``)."""
    adc_full_scale: float = 4.0
    """Pre-activation at which the readout saturates, in units of P_ref (``saturation``)."""
    output_full_scale: float | None = 16.0
    """Readout full scale for a node without a bounded nonlinearity (an output layer producing
    logits), in units of a after ``logit_gain``; None uses ``adc_full_scale``."""
    logit_gain: float = 4.0
    """Gain of the readout electronics of a node without a bounded nonlinearity (an output layer
    producing logits): a is ``logit_gain`` times the balanced power difference over P_ref.
    Larger logits let the softmax become confident; 4 trained the vowels better than 1 or 2."""
    gradient_method: str = "adjoint"
    """Method of ``local_gradient``: ``"adjoint"`` (ideal model) or ``"perturbation"`` (in situ)."""
    perturbation_phase: float = 0.05
    """Size of each phase perturbation for ``"perturbation"``, in rad (rounded to whole DAC steps)."""
    perturbation_samples: int | None = None
    """Number of perturbation codes; None uses a full orthogonal (Hadamard) set, one code per
    phase rounded up to a power of two, and a number uses that many random sign codes."""
    disabled: frozenset[str] = field(default_factory=frozenset)
    """Names of the stages switched off, from :data:`STAGES`."""

    def __post_init__(self) -> None:
        self._check_stages()
        if self.n_modes is not None and (int(self.n_modes) != self.n_modes or self.n_modes < 2):
            raise ConfigError(f"mzi n_modes must be None or an integer >= 2, got {self.n_modes}")
        check_bits("mzi", "phase_bits", self.phase_bits, 2, 24)
        check_bits("mzi", "input_dac_bits", self.input_dac_bits)
        check_bits("mzi", "adc_bits", self.adc_bits)
        check_positive("mzi", "max_phase_step", self.max_phase_step)
        for name in ("crosstalk", "splitter_error_dtod", "loss_db", "loss_db_dtod", "dark_current_na"):
            check_positive("mzi", name, getattr(self, name), allow_zero=True)
        for name in ("bias_amplitude", "power_mw", "responsivity_a_per_w", "bandwidth_ghz", "adc_full_scale", "logit_gain"):
            check_positive("mzi", name, getattr(self, name))
        if self.output_full_scale is not None:
            check_positive("mzi", "output_full_scale", self.output_full_scale)
        if int(self.bias_modes) != self.bias_modes or self.bias_modes < 0:
            raise ConfigError(f"mzi bias_modes must be an integer >= 0, got {self.bias_modes}")
        self._check_gradient_settings()


#: Named mesh presets. ``default`` (also ``silicon-photonic``) is a silicon-photonic mesh with
#: thermo-optic phase shifters and germanium photodiodes. Its numbers are typical values for
#: such chips, not figures fitted to one publication. It has 12-bit heater drivers, 0.5 % thermal
#: crosstalk to the neighbouring heater left after compensation, and couplers within about 2 %
#: of 50:50. Each MZI loses
#: 0.2 dB, each mode carries 0.1 mW, and the photodiodes have 1 A/W and 10 nA dark current at
#: 10 GHz, read by 8-bit converters. The mesh
#: architecture is that of Clements et al. 2016 (Optica 3, 1460). ``ideal`` switches every
#: stage off.
MZI_PRESETS: dict[str, MziConfig] = {
    "default": MziConfig(),
    "silicon-photonic": MziConfig(),
    "ideal": MziConfig().without("all"),
}


def mzi_preset(name: str) -> MziConfig:
    """Return the mesh preset called ``name``, or raise ConfigError listing the presets."""
    try:
        return MZI_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown mzi preset {name!r}; choose one of {', '.join(MZI_PRESETS)}") from None


# ------------------------------------------------------------------------------ mesh layout
def mesh_layout(n_modes: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the rectangular mesh's layout for ``n_modes`` modes.

    Returns
    -------
    column_start : numpy.ndarray
        int64 array of shape (n_modes + 1,): the MZIs of column ``c`` are
        ``column_start[c]:column_start[c + 1]``.
    top_mode : numpy.ndarray
        int64 array of shape (n_modes * (n_modes - 1) / 2,): the upper mode of each MZI; MZIs
        are ordered by column, then by mode.
    """
    if int(n_modes) != n_modes or n_modes < 2:
        raise ConfigError(f"a mesh needs an integer number of modes >= 2, got {n_modes}")
    n_modes = int(n_modes)
    starts = [0]
    modes: list[int] = []
    for column in range(n_modes):
        modes.extend(range(column % 2, n_modes - 1, 2))
        starts.append(len(modes))
    return np.array(starts, dtype=np.int64), np.array(modes, dtype=np.int64)


def n_mzis(n_modes: int) -> int:
    """Return the number of MZIs in a rectangular mesh on ``n_modes`` modes."""
    return n_modes * (n_modes - 1) // 2


@dataclass(frozen=True)
class MeshPhases:
    """Phases of a rectangular mesh, in rad.

    Attributes
    ----------
    theta
        Internal phase of each MZI, array of shape (n_mzi,), ordered as :func:`mesh_layout`.
    phi
        External phase of each MZI (on its upper input), array of shape (n_mzi,).
    output_phase
        Phase screen on the outputs, array of shape (n_modes,). Intensity detection does not see
        it, so :class:`MziNode` has no such parameter.
    """

    theta: np.ndarray
    phi: np.ndarray
    output_phase: np.ndarray

    @property
    def n_modes(self) -> int:
        """Number of modes of the mesh."""
        return int(self.output_phase.shape[0])


def _mzi_ideal(theta: float, phi: float) -> np.ndarray:
    s, c = math.sin(theta / 2), math.cos(theta / 2)
    pre = 1j * np.exp(1j * theta / 2)
    return pre * np.array([[np.exp(1j * phi) * s, c], [np.exp(1j * phi) * c, -s]])


def _check_unitary_input(matrix: Any) -> np.ndarray:
    try:
        u = np.asarray(matrix, dtype=np.complex128)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"decompose: expected a complex matrix, got {type(matrix).__name__} ({exc})") from None
    if u.ndim != 2 or u.shape[0] != u.shape[1] or u.shape[0] < 2:
        raise ConfigError(f"decompose: expected a square matrix of shape (N, N) with N >= 2, got shape {u.shape}")
    if not np.all(np.isfinite(u)):
        raise ConfigError("decompose: the matrix contains NaN or infinite values")
    deviation = float(np.linalg.norm(u.conj().T @ u - np.eye(u.shape[0])))
    if deviation > 1e-6:
        raise ConfigError(
            f"decompose: the matrix is not unitary (||U^H U - I|| = {deviation:.3g}, expected below 1e-6); "
            "a lossless mesh realises only unitary matrices"
        )
    return u


def decompose(matrix: Any) -> MeshPhases:
    """Find the phases with which the rectangular mesh realises a unitary matrix.

    Implements the nulling algorithm of Clements et al. 2016 (Optica 3, 1460) for the MZI
    convention of this module. MZIs applied from the right and from the left null the entries
    below the diagonal in alternating diagonals. The left MZIs are then moved through the
    remaining diagonal matrix, which becomes the output phase screen.

    Parameters
    ----------
    matrix
        Unitary matrix of shape (N, N), N >= 2.

    Returns
    -------
    MeshPhases
        Phases in [0, 2 pi) with ``build_unitary(phases)`` equal to ``matrix`` to rounding.

    Raises
    ------
    ConfigError
        If the matrix is not square, not finite or not unitary (to 1e-6).
    """
    u = _check_unitary_input(matrix).copy()
    n = u.shape[0]
    right: list[tuple[int, float, float]] = []  # (mode, theta, phi), applied as U <- U T^H
    left: list[tuple[int, float, float]] = []  # applied as U <- T U

    for i in range(n - 1):
        if i % 2 == 0:
            for j in range(i + 1):
                row, col = n - 1 - j, i - j
                a, b = u[row, col], u[row, col + 1]
                # Null U[row, col]: U T^H on columns (col, col+1) needs tan(theta/2) exp(-i phi) = -b / a.
                theta = 2.0 * math.atan2(abs(b), abs(a))
                phi = float(np.angle(-a / b)) if abs(b) > 0 and abs(a) > 0 else 0.0
                t = _mzi_ideal(theta, phi)
                u[:, col : col + 2] = u[:, col : col + 2] @ t.conj().T
                right.append((col, theta, phi))
        else:
            for j in range(1, i + 2):
                row, col = n + j - i - 2, j - 1
                a, b = u[row - 1, col], u[row, col]
                # Null U[row, col]: T U on rows (row-1, row) needs tan(theta/2) = |a| / |b|, phi = arg(b / a).
                theta = 2.0 * math.atan2(abs(a), abs(b))
                phi = float(np.angle(b / a)) if abs(a) > 0 and abs(b) > 0 else 0.0
                t = _mzi_ideal(theta, phi)
                u[row - 1 : row + 1, :] = t @ u[row - 1 : row + 1, :]
                left.append((row - 1, theta, phi))

    # Now D = L_k ... L_1 U R_1^H ... R_p^H is diagonal, so U = L_1^H ... L_k^H D R_p ... R_1.
    # Move each L^H through D: T(theta, phi)^H D = D' T(theta, phi'), with phi' = arg(d1 / d2),
    # d1' = -exp(-i theta) exp(-i phi) d2 and d2' = -exp(-i theta) d2 on the MZI's two modes.
    diag = np.diag(u).copy()
    moved: list[tuple[int, float, float]] = []
    for mode, theta, phi in reversed(left):
        d1, d2 = diag[mode], diag[mode + 1]
        new_phi = float(np.angle(d1 / d2))
        diag[mode] = -np.exp(-1j * theta) * np.exp(-1j * phi) * d2
        diag[mode + 1] = -np.exp(-1j * theta) * d2
        moved.append((mode, theta, new_phi))
    # U = D_out . T'_1 ... T'_k . R_p ... R_1: the light meets R_1 first and T'_1 last, and
    # ``moved`` is already in the order T'_k ... T'_1.
    sequence = list(right) + moved
    return _place_in_mesh(n, sequence, np.angle(diag))


def _place_in_mesh(n: int, sequence: list[tuple[int, float, float]], output_phase: np.ndarray) -> MeshPhases:
    """Assign MZIs, in the order the light meets them, to the slots of the rectangular mesh."""
    column_start, top_mode = mesh_layout(n)
    slot = {}
    for column in range(n):
        for index in range(column_start[column], column_start[column + 1]):
            slot[(column, int(top_mode[index]))] = index
    theta = np.zeros(n_mzis(n))
    phi = np.zeros(n_mzis(n))
    filled = np.zeros(n_mzis(n), dtype=bool)
    last_column = np.full(n, -1)
    for mode, t, p in sequence:
        column = max(last_column[mode], last_column[mode + 1]) + 1
        if column % 2 != mode % 2:
            column += 1
        index = slot.get((column, mode))
        if index is None or filled[index]:
            raise RuntimeError(f"decompose: MZI on modes ({mode}, {mode + 1}) does not fit column {column}")
        theta[index], phi[index], filled[index] = t, p, True
        last_column[mode] = last_column[mode + 1] = column
    return MeshPhases(np.mod(theta, TWO_PI), np.mod(phi, TWO_PI), np.mod(output_phase, TWO_PI))


def _check_phase_array(values: Any, name: str, length: int) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=FLOAT)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: expected numbers, got {type(values).__name__} ({exc})") from None
    if array.shape != (length,):
        raise ConfigError(f"{name}: expected shape ({length},), got {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = np.flatnonzero(~np.isfinite(array))
        raise ConfigError(f"{name}: phase {array[bad[0]]} at index {bad[0]} is not finite; phases must be finite, in rad")
    return np.ascontiguousarray(array)


def build_unitary(phases: MeshPhases) -> np.ndarray:
    """Return the transfer matrix of an ideal lossless mesh, complex array of shape (N, N).

    Column ``k`` of the result is the output field for unit amplitude on input mode ``k``.

    Raises
    ------
    ConfigError
        If the phase arrays do not fit one mesh (theta and phi need N (N - 1) / 2 entries for
        N = len(output_phase)) or contain non-finite values.
    """
    n = int(np.asarray(phases.output_phase).shape[0]) if np.ndim(phases.output_phase) == 1 else -1
    if n < 2:
        raise ConfigError(
            f"build_unitary: output_phase must have shape (N,) with N >= 2 modes, got {np.shape(phases.output_phase)}"
        )
    theta = _check_phase_array(phases.theta, "build_unitary theta", n_mzis(n))
    phi = _check_phase_array(phases.phi, "build_unitary phi", n_mzis(n))
    output_phase = _check_phase_array(phases.output_phase, "build_unitary output_phase", n)
    column_start, top_mode = mesh_layout(n)
    transfer = _mzi_transfer_kernel(theta, phi, np.zeros_like(theta), np.zeros_like(theta), np.ones_like(theta))
    u = _propagate_matrix_kernel(np.eye(n, dtype=np.complex128), top_mode, column_start, transfer)
    return np.exp(1j * output_phase)[:, None] * u


# ---------------------------------------------------------------------------------- kernels
@njit(cache=True)
def _mzi_transfer_kernel(theta, phi, alpha_in, alpha_out, amplitude):
    """Return the 2x2 transfer matrix of every MZI, complex array of shape (n_mzi, 2, 2).

    T = amplitude * B(alpha_out) diag(exp(i theta), 1) B(alpha_in) diag(exp(i phi), 1), where
    B(alpha) = [[cos(pi/4 + alpha), i sin(pi/4 + alpha)], [i sin(pi/4 + alpha), cos(pi/4 + alpha)]].
    """
    quarter = np.pi / 4
    return _mzi_transfer_from_couplers(
        theta, phi, np.cos(quarter + alpha_in), np.sin(quarter + alpha_in),
        np.cos(quarter + alpha_out), np.sin(quarter + alpha_out), amplitude,
    )


@njit(cache=True)
def _mzi_transfer_from_couplers(theta, phi, cos_in, sin_in, cos_out, sin_out, amplitude):
    """:func:`_mzi_transfer_kernel` with the couplers' cosines and sines precomputed."""
    n = theta.shape[0]
    out = np.empty((n, 2, 2), dtype=np.complex128)
    for i in range(n):
        c1, s1, c2, s2 = cos_in[i], sin_in[i], cos_out[i], sin_out[i]
        et = np.cos(theta[i]) + 1j * np.sin(theta[i])
        ep = np.cos(phi[i]) + 1j * np.sin(phi[i])
        t = amplitude[i]
        out[i, 0, 0] = t * ep * (c2 * c1 * et - s2 * s1)
        out[i, 0, 1] = t * 1j * (c2 * s1 * et + s2 * c1)
        out[i, 1, 0] = t * 1j * ep * (s2 * c1 * et + c2 * s1)
        out[i, 1, 1] = t * (c2 * c1 - s2 * s1 * et)
    return out


@njit(cache=True)
def _propagate_matrix_kernel(fields, top_mode, column_start, transfer):
    """Send every column of ``fields`` (shape (N, K)) through the mesh, in place; return it."""
    n_columns = column_start.shape[0] - 1
    k_count = fields.shape[1]
    for c in range(n_columns):
        for i in range(column_start[c], column_start[c + 1]):
            m = top_mode[i]
            t00, t01, t10, t11 = transfer[i, 0, 0], transfer[i, 0, 1], transfer[i, 1, 0], transfer[i, 1, 1]
            for k in range(k_count):
                u = fields[m, k]
                v = fields[m + 1, k]
                fields[m, k] = t00 * u + t01 * v
                fields[m + 1, k] = t10 * u + t11 * v
    return fields


@njit(cache=True)
def _crosstalk_kernel(phases, has_upper, crosstalk):
    """Return phases plus ``crosstalk`` times the phases of the same-column neighbours.

    has_upper[i] is True when MZI i - 1 sits directly above MZI i in the same column.
    """
    n = phases.shape[0]
    out = phases.copy()
    if crosstalk == 0.0:
        return out
    for i in range(1, n):
        if has_upper[i]:
            out[i] += crosstalk * phases[i - 1]
            out[i - 1] += crosstalk * phases[i]
    return out


@njit(cache=True)
def _device_transfer_kernel(theta, phi, has_upper, crosstalk, couplers, amplitude):
    """Apply thermal crosstalk to both phase arrays, then return every MZI's 2x2 transfer matrix.

    couplers : float64 array of shape (4, n_mzi): cos and sin of pi/4 + alpha_in, then of
    pi/4 + alpha_out.
    """
    return _mzi_transfer_from_couplers(
        _crosstalk_kernel(theta, has_upper, crosstalk), _crosstalk_kernel(phi, has_upper, crosstalk),
        couplers[0], couplers[1], couplers[2], couplers[3], amplitude,
    )


@njit(cache=True)
def _readout_matrix_kernel(n_modes, n_lit, n_rows, top_mode, column_start, transfer):
    """Return the mesh's transfer from the lit input modes to the detector modes.

    Propagates unit fields on modes 0..n_lit-1 through the mesh and keeps output modes
    0..n_rows-1. Returns real and imaginary parts, each float64 of shape (n_lit, n_rows). The
    fields are kept as separate real and imaginary arrays so that the loop over input modes
    compiles to vector instructions.
    """
    real = np.zeros((n_modes, n_lit))
    imag = np.zeros((n_modes, n_lit))
    for k in range(n_lit):
        real[k, k] = 1.0
    n_columns = column_start.shape[0] - 1
    for c in range(n_columns):
        for i in range(column_start[c], column_start[c + 1]):
            m = top_mode[i]
            ar, ai = transfer[i, 0, 0].real, transfer[i, 0, 0].imag
            br, bi = transfer[i, 0, 1].real, transfer[i, 0, 1].imag
            cr, ci = transfer[i, 1, 0].real, transfer[i, 1, 0].imag
            dr, di = transfer[i, 1, 1].real, transfer[i, 1, 1].imag
            # Each column spreads light by at most one mode, so before column c the light of
            # input k lies on modes k - c .. k + c; other inputs are still zero on (m, m + 1).
            lo = max(0, m - c - 1)
            hi = min(n_lit, m + c + 3)
            for k in range(lo, hi):
                ur, ui = real[m, k], imag[m, k]
                vr, vi = real[m + 1, k], imag[m + 1, k]
                real[m, k] = ar * ur - ai * ui + br * vr - bi * vi
                imag[m, k] = ar * ui + ai * ur + br * vi + bi * vr
                real[m + 1, k] = cr * ur - ci * ui + dr * vr - di * vi
                imag[m + 1, k] = cr * ui + ci * ur + dr * vi + di * vr
    return real[:n_rows].T.copy(), imag[:n_rows].T.copy()


@njit(cache=True)
def _mesh_forward_kernel(
    x, bias_amplitude, n_bias, readout_real, readout_imag, n_out,
    detector_scale, shot_coefficient, dark_variance, saturate, full_scale, adc_steps, activation, rng,
):
    """Detect the mesh output of a batch on the balanced pairs; return (pre-activation, outputs).

    x : float64 array of shape (batch, n_in), input amplitudes as applied.
    readout_real, readout_imag : (n_in + n_bias, 2 n_out), from :func:`_readout_matrix_kernel`.
    detector_scale : 1 / (P_ref / P_mode), turns a power difference in units of P_mode into a.
    shot_coefficient : variance of a per unit of (P_2j + P_2j+1) / P_mode (0 when off).
    dark_variance : variance of a from the two dark currents (0 when off).
    """
    batch, n_in = x.shape
    n_lit = n_in + n_bias
    a = np.empty((batch, n_out))
    y = np.empty((batch, n_out))
    # Fields on the detector modes for the whole batch, as two real matrix products (BLAS).
    lit = np.empty((batch, n_lit))
    lit[:, :n_in] = x
    lit[:, n_in:] = bias_amplitude
    fields_real = np.dot(lit, readout_real)
    fields_imag = np.dot(lit, readout_imag)
    for b in range(batch):
        field_real = fields_real[b]
        field_imag = fields_imag[b]
        for j in range(n_out):
            p_plus = field_real[2 * j] ** 2 + field_imag[2 * j] ** 2
            p_minus = field_real[2 * j + 1] ** 2 + field_imag[2 * j + 1] ** 2
            v = (p_plus - p_minus) * detector_scale
            variance = shot_coefficient * (p_plus + p_minus) + dark_variance
            if variance > 0:
                v += np.sqrt(variance) * rng.standard_normal()
            if saturate:
                v = min(full_scale, max(-full_scale, v))
            if adc_steps > 0:
                v = np.round(v / full_scale * adc_steps) / adc_steps * full_scale
            a[b, j] = v
            y[b, j] = _activate(v, activation)
    return a, y


@njit(cache=True)
def _mesh_adjoint_kernel(x, n_modes, bias_start, n_bias, bias_amplitude, top_mode, column_start, theta, phi,
                         delta, detector_scale):
    """Differentiate sum(delta * a) through the ideal mesh (50:50 couplers, no loss, no noise).

    Returns (grad_theta, grad_phi) summed over the batch, each of shape (n_mzi,), and the
    per-example input gradient of shape (batch, n_in).
    """
    batch, n_in = x.shape
    n_out = delta.shape[1]
    n_columns = column_start.shape[0] - 1
    n_mzi = theta.shape[0]
    r = 1.0 / np.sqrt(2.0)
    grad_theta = np.zeros(n_mzi)
    grad_phi = np.zeros(n_mzi)
    grad_x = np.empty((batch, n_in))
    # history[c] is the field entering column c; history[n_columns] is the output field.
    history = np.empty((n_columns + 1, n_modes), dtype=np.complex128)
    adjoint = np.empty(n_modes, dtype=np.complex128)
    e_theta = np.exp(1j * theta)
    e_phi = np.exp(1j * phi)
    for b in range(batch):
        for k in range(n_modes):
            history[0, k] = 0.0
        for k in range(n_in):
            history[0, k] = x[b, k]
        for k in range(n_bias):
            history[0, bias_start + k] = bias_amplitude

        for c in range(n_columns):
            for k in range(n_modes):
                history[c + 1, k] = history[c, k]
            for i in range(column_start[c], column_start[c + 1]):
                m = top_mode[i]
                s1_0 = e_phi[i] * history[c, m]
                s1_1 = history[c, m + 1]
                s3_0 = e_theta[i] * r * (s1_0 + 1j * s1_1)
                s2_1 = r * (1j * s1_0 + s1_1)
                history[c + 1, m] = r * (s3_0 + 1j * s2_1)
                history[c + 1, m + 1] = r * (1j * s3_0 + s2_1)

        # dL/d(conj field) at the output: dL/dP_k times the field, with the detector's sign.
        for k in range(n_modes):
            adjoint[k] = 0.0
        for j in range(n_out):
            weight = delta[b, j] * detector_scale
            adjoint[2 * j] = weight * history[n_columns, 2 * j]
            adjoint[2 * j + 1] = -weight * history[n_columns, 2 * j + 1]

        for c in range(n_columns - 1, -1, -1):
            for i in range(column_start[c], column_start[c + 1]):
                m = top_mode[i]
                s1_0 = e_phi[i] * history[c, m]
                s1_1 = history[c, m + 1]
                s3_0 = e_theta[i] * r * (s1_0 + 1j * s1_1)
                p = adjoint[m]
                q = adjoint[m + 1]
                # Back through the second coupler (B^H), the theta shifter, the first coupler.
                l3_0 = r * (p - 1j * q)
                l3_1 = r * (-1j * p + q)
                grad_theta[i] += -2.0 * (np.conj(l3_0) * s3_0).imag
                l2_0 = np.conj(e_theta[i]) * l3_0
                l1_0 = r * (l2_0 - 1j * l3_1)
                l1_1 = r * (-1j * l2_0 + l3_1)
                grad_phi[i] += -2.0 * (np.conj(l1_0) * s1_0).imag
                adjoint[m] = np.conj(e_phi[i]) * l1_0
                adjoint[m + 1] = l1_1

        for k in range(n_in):
            grad_x[b, k] = 2.0 * adjoint[k].real
    return grad_theta, grad_phi, grad_x


@njit(cache=True)
def _wrap_into(out, values, resolution, levels):
    """Write ``values`` wrapped into [0, 2 pi), rounded to ``levels`` grid steps when > 0."""
    for i in range(values.shape[0]):
        v = values[i] % (2.0 * np.pi)
        if levels > 0:
            v = (np.round(v / resolution) % levels) * resolution
        out[i] = v


@njit(cache=True)
def _mesh_perturbation_kernel(
    x, theta, phi, codes, step, resolution, levels, has_upper, crosstalk, couplers, amplitude,
    n_modes, top_mode, column_start, bias_amplitude, n_bias, n_out, detector_scale, shot_coefficient,
    dark_variance, saturate, full_scale, adc_steps, activation, error, use_preactivation, rng,
):
    """Measure the perturbation gradient estimate on the device, one code pair after another.

    Does what the base class's Python loop does (the + run, then the - run of each code, with
    the same random draws) without leaving compiled code. Returns the estimate, shape
    (2 n_mzi,): theta first, then phi.
    """
    n_mzi = theta.shape[0]
    batch, n_in = x.shape
    n_codes = codes.shape[0]
    estimate = np.zeros(2 * n_mzi)
    theta_run = np.empty(n_mzi)
    phi_run = np.empty(n_mzi)
    for k in range(n_codes):
        change = 0.0
        for sign in (1.0, -1.0):
            _wrap_into(theta_run, theta + sign * step * codes[k, :n_mzi], resolution, levels)
            _wrap_into(phi_run, phi + sign * step * codes[k, n_mzi:], resolution, levels)
            transfer = _device_transfer_kernel(theta_run, phi_run, has_upper, crosstalk, couplers, amplitude)
            readout_real, readout_imag = _readout_matrix_kernel(
                n_modes, n_in + n_bias, 2 * n_out, top_mode, column_start, transfer
            )
            a, y = _mesh_forward_kernel(
                x, bias_amplitude, n_bias, readout_real, readout_imag, n_out, detector_scale,
                shot_coefficient, dark_variance, saturate, full_scale, adc_steps, activation, rng,
            )
            signal = a if use_preactivation else y
            loss = 0.0
            for b in range(batch):
                for j in range(n_out):
                    loss += error[b, j] * signal[b, j]
            change += sign * loss / batch
        for i in range(2 * n_mzi):
            estimate[i] += change / (2.0 * step) * codes[k, i]
    return estimate / n_codes


# ------------------------------------------------------------------------------------ node
class MziNode(OpticalNode):
    """A simulated MZI mesh layer with balanced photodetection, ``f(a)`` with ``a`` as above.

    Parameters
    ----------
    n_in, n_out
        Number of inputs (modulated modes) and outputs (balanced detector pairs).
    activation
        Nonlinearity applied to the measured pre-activation: ``"tanh"``, ``"hardtanh"``,
        ``"sigmoid"`` or ``"linear"``.
    config
        Device settings; :data:`MZI_PRESETS` has named ones. ``config.gradient_method`` selects
        the local gradient.
    rng
        Generator or seed for the initial phases, the fixed device errors and the noise.
    name
        Name in messages and the run record.
    preset
        Name of the preset the config came from, for the run record.

    Raises
    ------
    ConfigError
        If the layer needs more modes than ``config.n_modes``, or a setting is invalid.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        activation: str = "tanh",
        config: MziConfig | None = None,
        rng: np.random.Generator | int | None = None,
        name: str = "mzi",
        preset: str | None = None,
    ) -> None:
        config = config if config is not None else MziConfig()
        super().__init__(
            name, n_in, n_out, activation=activation, config=config, rng=rng, preset=preset,
            output_unit="1 (balanced photocurrent relative to the mean photocurrent per mode at full-scale input)",
        )
        cfg = self.config
        needed = max(self.n_in + cfg.bias_modes, 2 * self.n_out)
        if cfg.n_modes is not None and cfg.n_modes < needed:
            raise ConfigError(
                f"node {name!r}: a mesh layer with {self.n_in} inputs, {cfg.bias_modes} bias mode(s) and "
                f"{self.n_out} balanced outputs needs at least {needed} modes, but the chip has "
                f"n_modes={cfg.n_modes}; use a chip with more modes or a narrower layer"
            )
        self.n_modes = int(cfg.n_modes) if cfg.n_modes is not None else needed
        self.column_start, self.top_mode = mesh_layout(self.n_modes)
        count = n_mzis(self.n_modes)

        levels = 2**cfg.phase_bits if cfg.enabled("phase_resolution") else None
        self._specs = {
            "theta": phase_spec((count,), levels, cfg.max_phase_step, "internal phase of each MZI"),
            "phi": phase_spec((count,), levels, cfg.max_phase_step, "external phase of each MZI (upper input)"),
        }

        # Draw the initial phases first, so one seed gives the same phases under every preset.
        initial = {
            "theta": self.rng.uniform(0.0, TWO_PI, count),
            "phi": self.rng.uniform(0.0, TWO_PI, count),
        }

        # Fixed errors of this device, drawn once; they stay zero when their stage is off.
        alpha_in = np.zeros(count)
        alpha_out = np.zeros(count)
        if cfg.enabled("splitter_error") and cfg.splitter_error_dtod > 0:
            alpha_in = self.rng.normal(0.0, cfg.splitter_error_dtod, count)
            alpha_out = self.rng.normal(0.0, cfg.splitter_error_dtod, count)
        amplitude = np.ones(count)
        if cfg.enabled("loss"):
            loss_db = np.maximum(cfg.loss_db + cfg.loss_db_dtod * self.rng.standard_normal(count), 0.0)
            amplitude = 10.0 ** (-loss_db / 20.0)
        self._set_device_errors(alpha_in, alpha_out, amplitude)
        # True where MZI i - 1 sits directly above MZI i in the same column (two modes up).
        self._has_upper = np.zeros(count, dtype=bool)
        for column in range(self.n_modes):
            self._has_upper[self.column_start[column] + 1 : self.column_start[column + 1]] = True

        # Readout scales: P_ref is the mean power per mode with every input at full scale. The
        # readout gain is calibrated for the nominal loss of a path through the mesh (N - 1 MZIs
        # on average), so the device's a matches the ideal model's a on average.
        # A node without a bounded nonlinearity produces logits, read with the logit gain.
        bounded = self.activation.upper < np.inf
        self.readout_gain = 1.0 if bounded else cfg.logit_gain
        self.full_scale = cfg.adc_full_scale if bounded or cfg.output_full_scale is None else cfg.output_full_scale
        self.reference_power = (self.n_in + cfg.bias_modes * cfg.bias_amplitude**2) / self.n_modes
        self.model_scale = self.readout_gain / self.reference_power
        self.path_transmission = 10.0 ** (-cfg.loss_db * (self.n_modes - 1) / 10.0) if cfg.enabled("loss") else 1.0
        self.detector_scale = self.model_scale / self.path_transmission
        # Photocurrent that the readout maps to a = readout_gain, in A.
        reference_current = cfg.responsivity_a_per_w * cfg.power_mw * 1e-3 * self.reference_power * self.path_transmission
        bandwidth = cfg.bandwidth_ghz * 1e9
        noise_scale = (self.readout_gain / reference_current) ** 2
        # Shot noise variance 2 q B I, with I = R P_mode (P_plus + P_minus), in units of a.
        self._shot_coefficient = (
            2 * ELEMENTARY_CHARGE * bandwidth * cfg.responsivity_a_per_w * cfg.power_mw * 1e-3 * noise_scale
            if cfg.enabled("shot_noise") else 0.0
        )
        self._dark_variance = (
            2 * 2 * ELEMENTARY_CHARGE * bandwidth * cfg.dark_current_na * 1e-9 * noise_scale
            if cfg.enabled("dark_noise") else 0.0
        )

        self.set_parameters(initial)

    # ------------------------------------------------------------------------------ physics
    def effective_phases(self, phases: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Return the phases acting on the light after thermal crosstalk, in rad, by parameter name."""
        phases = self.phases if phases is None else phases
        kappa = self.config.crosstalk if self.config.enabled("crosstalk") else 0.0
        return {
            name: _crosstalk_kernel(np.ascontiguousarray(value, dtype=FLOAT), self._has_upper, float(kappa))
            for name, value in phases.items()
        }

    def transfer_matrices(self, phases: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Return every MZI's 2x2 transfer matrix on the device, complex array of shape (n_mzi, 2, 2)."""
        phases = self.phases if phases is None else phases
        kappa = self.config.crosstalk if self.config.enabled("crosstalk") else 0.0
        return _device_transfer_kernel(
            np.ascontiguousarray(phases["theta"], dtype=FLOAT), np.ascontiguousarray(phases["phi"], dtype=FLOAT),
            self._has_upper, float(kappa), self._coupler_terms, self.amplitude,
        )

    def _set_device_errors(self, alpha_in: np.ndarray, alpha_out: np.ndarray, amplitude: np.ndarray) -> None:
        """Store the fixed coupler errors (rad) and MZI amplitude transmissions of this device."""
        self.alpha_in, self.alpha_out, self.amplitude = alpha_in, alpha_out, amplitude
        angle_in, angle_out = math.pi / 4 + alpha_in, math.pi / 4 + alpha_out
        self._coupler_terms = np.stack([np.cos(angle_in), np.sin(angle_in), np.cos(angle_out), np.sin(angle_out)])

    def device_matrix(self) -> np.ndarray:
        """Return the device's field transfer matrix, complex array of shape (n_modes, n_modes)."""
        return _propagate_matrix_kernel(
            np.eye(self.n_modes, dtype=np.complex128), self.top_mode, self.column_start, self.transfer_matrices()
        )

    def _readout_matrix(self, phases: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return _readout_matrix_kernel(
            self.n_modes, self.n_in + self.config.bias_modes, 2 * self.n_out, self.top_mode, self.column_start,
            self.transfer_matrices(phases),
        )

    def _phases_changed(self) -> None:
        # The forward pass only needs the transfer from the lit inputs to the detectors, and it
        # changes only when the phases do.
        self._readout = self._readout_matrix(self.phases)

    def _saturated(self, a: np.ndarray) -> np.ndarray | None:
        if not self.config.enabled("saturation"):
            return None
        return np.abs(a) >= self.full_scale * (1 - 1e-9)

    def _measure(self, x_applied: np.ndarray, phases: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        readout_real, readout_imag = self._readout if phases is self.phases else self._readout_matrix(phases)
        adc_steps = 2 ** (cfg.adc_bits - 1) - 1 if cfg.enabled("adc") else 0
        return _mesh_forward_kernel(
            x_applied, float(cfg.bias_amplitude), cfg.bias_modes, readout_real, readout_imag, self.n_out,
            self.detector_scale, self._shot_coefficient, self._dark_variance, cfg.enabled("saturation"),
            float(self.full_scale), adc_steps, self._activation_code, self.rng,
        )

    def _perturbation_estimate(
        self, x_applied: np.ndarray, error: np.ndarray, at: str, flat: np.ndarray, codes: np.ndarray, step: float
    ) -> np.ndarray:
        cfg = self.config
        n_mzi = self._specs["theta"].shape[0]
        resolution = self._specs["theta"].resolution
        levels = round(TWO_PI / resolution) if resolution > 0 else 0
        kappa = cfg.crosstalk if cfg.enabled("crosstalk") else 0.0
        adc_steps = 2 ** (cfg.adc_bits - 1) - 1 if cfg.enabled("adc") else 0
        return _mesh_perturbation_kernel(
            x_applied, np.ascontiguousarray(flat[:n_mzi]), np.ascontiguousarray(flat[n_mzi:]),
            np.ascontiguousarray(codes, dtype=FLOAT), float(step), float(resolution), levels, self._has_upper,
            float(kappa), self._coupler_terms, self.amplitude, self.n_modes, self.top_mode, self.column_start,
            float(cfg.bias_amplitude), cfg.bias_modes, self.n_out, self.detector_scale, self._shot_coefficient,
            self._dark_variance, cfg.enabled("saturation"), float(self.full_scale), adc_steps,
            self._activation_code, np.ascontiguousarray(error, dtype=FLOAT), at == "preactivation", self.rng,
        )

    def _model_gradient(self, x_applied: np.ndarray, delta: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        cfg = self.config
        grad_theta, grad_phi, grad_x = _mesh_adjoint_kernel(
            x_applied, self.n_modes, self.n_in, cfg.bias_modes, float(cfg.bias_amplitude), self.top_mode,
            self.column_start, self.phases["theta"], self.phases["phi"], delta, self.model_scale,
        )
        return {"theta": grad_theta, "phi": grad_phi}, grad_x

    def mesh_phases(self) -> MeshPhases:
        """Return the current phases as :class:`MeshPhases`, with a zero output phase screen."""
        return MeshPhases(self.phases["theta"].copy(), self.phases["phi"].copy(), np.zeros(self.n_modes))

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info["n_modes"] = self.n_modes
        return info

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["device"] = {"alpha_in": self.alpha_in.copy(), "alpha_out": self.alpha_out.copy(),
                           "amplitude": self.amplitude.copy()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = state.get("device")
        if device is not None:
            arrays = {}
            for key in ("alpha_in", "alpha_out", "amplitude"):
                value = np.asarray(device[key], dtype=FLOAT)
                if value.shape != self.alpha_in.shape:
                    raise ConfigError(f"{self._where()}: saved {key} has shape {value.shape}, expected {self.alpha_in.shape}")
                arrays[key] = value.copy()
            self._set_device_errors(**arrays)
        super().load_state_dict(state)
