"""Transfer models: the curve that maps a channel's nominal stimulus to its measured output.

A calibration fits one model per output channel. The stimulus ``a`` is what the node is
expected to produce on that channel from its settings (see :mod:`pnn.calibration.reference`),
and the model gives what the instrument reads instead:

- ``linear``: ``y = gain * a + offset``, the gain and offset of a read-out chain.
- ``polyN`` (N from 2 to 5): ``y = c0 + c1 a + ... + cN a**N``, a smooth nonlinearity.
- ``tanh``: ``y = amplitude * tanh(gain * a + shift) + offset``, a saturating amplifier or a
  node whose periphery applies tanh.
- ``sigmoid``: ``y = amplitude / (1 + exp(-(gain * a + shift))) + offset``.
- ``cos2``: ``y = amplitude * cos((pi * a / a_pi + phase) / 2) ** 2 + offset``, the output power
  of a Mach-Zehnder interferometer whose phase shifter is driven by ``a``. ``a_pi`` is the drive
  that shifts the phase by pi (V_pi for an electro-optic shifter).

Every function broadcasts: ``a`` may be an array of shape (batch, n_out) and each parameter an
array of shape (n_out,), one value per channel.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from ..errors import CalibrationError, ConfigError

__all__ = ["TransferModel", "MODEL_NAMES", "get_model"]

#: Names accepted by :func:`get_model`.
MODEL_NAMES = ("linear", "poly2", "poly3", "poly4", "poly5", "tanh", "sigmoid", "cos2")

# Points of the grid on which a numerical inverse checks that a curve is monotonic.
_MONOTONIC_GRID = 513
# Bisection steps of the numerical inverse: 60 halvings shrink any finite range below 1e-15 of it.
_BISECTION_STEPS = 60


class TransferModel(ABC):
    """One family of transfer curves ``y = f(a; p)``, with its derivative, guess and inverse."""

    #: Name used in records and on the command line.
    name: str = ""
    #: Names of the fitted parameters, in the order :meth:`function` takes them.
    parameter_names: tuple[str, ...] = ()
    #: The formula, for summaries and plots.
    formula: str = ""

    @property
    def n_parameters(self) -> int:
        """Number of fitted parameters."""
        return len(self.parameter_names)

    @abstractmethod
    def function(self, a: np.ndarray, *p: np.ndarray | float) -> np.ndarray:
        """Return ``y = f(a; p)``, broadcasting ``a`` against each parameter."""

    @abstractmethod
    def derivative(self, a: np.ndarray, *p: np.ndarray | float) -> np.ndarray:
        """Return ``dy/da`` at ``a``."""

    @abstractmethod
    def guess(self, a: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Return starting values for a fit to the points ``(a, y)``, arrays of shape (n,)."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Return lower and upper bounds of the parameters for the fit (infinite by default)."""
        n = self.n_parameters
        return np.full(n, -np.inf), np.full(n, np.inf)

    def inverse(self, y: np.ndarray, p: Sequence[float], a_range: tuple[float, float]) -> np.ndarray:
        """Return the stimulus ``a`` in ``a_range`` whose output is ``y``, for one channel.

        The default solves numerically by bisection, which needs the curve to be monotonic over
        ``a_range``.

        Raises
        ------
        CalibrationError
            If the curve is not monotonic over the range, or a value of ``y`` lies outside the
            outputs the curve reaches there.
        """
        lo, hi = float(a_range[0]), float(a_range[1])
        grid = np.linspace(lo, hi, _MONOTONIC_GRID)
        values = self.function(grid, *p)
        steps = np.diff(values)
        if not (np.all(steps > 0) or np.all(steps < 0)):
            raise CalibrationError(
                f"the {self.name} curve is not monotonic over the stimulus range [{lo:g}, {hi:g}], "
                "so an output does not determine one stimulus; invert over a narrower range"
            )
        increasing = steps[0] > 0
        y = np.asarray(y, dtype=np.float64)
        _check_reachable(y, float(values.min()), float(values.max()), self.name)

        # Vectorised bisection: every value of y narrows its own bracket.
        low = np.full(y.shape, lo)
        high = np.full(y.shape, hi)
        for _ in range(_BISECTION_STEPS):
            middle = 0.5 * (low + high)
            above = self.function(middle, *p) > y
            go_low = above if increasing else ~above
            high = np.where(go_low, middle, high)
            low = np.where(go_low, low, middle)
        return 0.5 * (low + high)

    def __repr__(self) -> str:
        return f"<TransferModel {self.name}: {self.formula}>"


def _check_reachable(y: np.ndarray, lowest: float, highest: float, name: str) -> None:
    # A tolerance of 1e-9 of the span keeps values produced by the curve itself invertible.
    slack = 1e-9 * max(highest - lowest, 1e-300)
    outside = (y < lowest - slack) | (y > highest + slack) | ~np.isfinite(y)
    if np.any(outside):
        worst = float(y[outside].flat[0])
        raise CalibrationError(
            f"output {worst:g} lies outside the range [{lowest:g}, {highest:g}] that the {name} "
            "curve reaches over its calibrated stimulus range, so it cannot be converted; "
            "recalibrate over a wider range"
        )


def _slope_guess(a: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Return slope and intercept of a straight-line fit, or (1, mean) for a degenerate stimulus."""
    if np.ptp(a) == 0:
        return 1.0, float(np.mean(y))
    slope, intercept = np.polyfit(a, y, 1)
    return float(slope), float(intercept)


class LinearModel(TransferModel):
    """``y = gain * a + offset``."""

    name = "linear"
    parameter_names = ("gain", "offset")
    formula = "y = gain * a + offset"

    def function(self, a, gain, offset):
        return gain * a + offset

    def derivative(self, a, gain, offset):
        return np.broadcast_to(gain, np.broadcast(a, gain).shape).astype(np.float64)

    def guess(self, a, y):
        return np.array(_slope_guess(a, y))

    def inverse(self, y, p, a_range):
        gain, offset = float(p[0]), float(p[1])
        if gain == 0:
            raise CalibrationError("the linear calibration has a gain of 0, so outputs cannot be converted back")
        y = np.asarray(y, dtype=np.float64)
        if not np.all(np.isfinite(y)):
            raise CalibrationError("outputs contain NaN or infinite values, which cannot be converted")
        return (y - offset) / gain


class PolynomialModel(TransferModel):
    """``y = c0 + c1 a + ... + cN a**N``."""

    formula = ""

    def __init__(self, degree: int) -> None:
        if not 2 <= degree <= 5:
            raise ConfigError(f"polynomial degree must be between 2 and 5, got {degree}; use 'linear' for degree 1")
        self.degree = int(degree)
        self.name = f"poly{self.degree}"
        self.parameter_names = tuple(f"c{i}" for i in range(self.degree + 1))
        self.formula = "y = " + " + ".join(["c0", "c1 a", *(f"c{i} a^{i}" for i in range(2, self.degree + 1))])

    def function(self, a, *c):
        a = np.asarray(a, dtype=np.float64)
        # Horner's scheme, highest power first.
        result = np.zeros(np.broadcast(a, *c).shape) + c[-1]
        for coefficient in reversed(c[:-1]):
            result = result * a + coefficient
        return result

    def derivative(self, a, *c):
        a = np.asarray(a, dtype=np.float64)
        result = np.zeros(np.broadcast(a, *c).shape) + self.degree * np.asarray(c[-1])
        for power in range(self.degree - 1, 0, -1):
            result = result * a + power * np.asarray(c[power])
        return result

    def guess(self, a, y):
        if np.ptp(a) == 0:
            return np.r_[np.mean(y), np.zeros(self.degree)]
        return np.polyfit(a, y, self.degree)[::-1].copy()


class TanhModel(TransferModel):
    """``y = amplitude * tanh(gain * a + shift) + offset``."""

    name = "tanh"
    parameter_names = ("amplitude", "gain", "shift", "offset")
    formula = "y = amplitude * tanh(gain * a + shift) + offset"

    def function(self, a, amplitude, gain, shift, offset):
        return amplitude * np.tanh(gain * a + shift) + offset

    def derivative(self, a, amplitude, gain, shift, offset):
        t = np.tanh(gain * a + shift)
        return amplitude * gain * (1.0 - t * t)

    def guess(self, a, y):
        return np.array(_saturation_guess(a, y))

    def bounds(self):
        # A positive amplitude fixes the sign convention (the gain carries the sign).
        return np.array([0.0, -np.inf, -np.inf, -np.inf]), np.full(4, np.inf)

    def inverse(self, y, p, a_range):
        amplitude, gain, shift, offset = (float(v) for v in p)
        if amplitude == 0 or gain == 0:
            raise CalibrationError("the tanh calibration has a zero amplitude or gain, so outputs cannot be converted back")
        y = np.asarray(y, dtype=np.float64)
        _check_reachable(y, offset - abs(amplitude), offset + abs(amplitude), self.name)
        ratio = np.clip((y - offset) / amplitude, -1 + 1e-15, 1 - 1e-15)
        return (np.arctanh(ratio) - shift) / gain


class SigmoidModel(TransferModel):
    """``y = amplitude / (1 + exp(-(gain * a + shift))) + offset``."""

    name = "sigmoid"
    parameter_names = ("amplitude", "gain", "shift", "offset")
    formula = "y = amplitude / (1 + exp(-(gain * a + shift))) + offset"

    def function(self, a, amplitude, gain, shift, offset):
        # 0.5 (1 + tanh(z / 2)) is the logistic function without overflow for large |z|.
        return amplitude * 0.5 * (1.0 + np.tanh(0.5 * (gain * a + shift))) + offset

    def derivative(self, a, amplitude, gain, shift, offset):
        s = 0.5 * (1.0 + np.tanh(0.5 * (gain * a + shift)))
        return amplitude * gain * s * (1.0 - s)

    def guess(self, a, y):
        amplitude, gain, shift, offset = _saturation_guess(a, y)
        # Same curve as tanh: amplitude A tanh(z) + o = 2A sigmoid(2z) - A + o.
        return np.array([2 * amplitude, 2 * gain, 2 * shift, offset - amplitude])

    def bounds(self):
        return np.array([0.0, -np.inf, -np.inf, -np.inf]), np.full(4, np.inf)

    def inverse(self, y, p, a_range):
        amplitude, gain, shift, offset = (float(v) for v in p)
        if amplitude == 0 or gain == 0:
            raise CalibrationError("the sigmoid calibration has a zero amplitude or gain, so outputs cannot be converted back")
        y = np.asarray(y, dtype=np.float64)
        _check_reachable(y, min(offset, offset + amplitude), max(offset, offset + amplitude), self.name)
        s = np.clip((y - offset) / amplitude, 1e-15, 1 - 1e-15)
        return (np.log(s / (1.0 - s)) - shift) / gain


def _saturation_guess(a: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """Return starting values ``(amplitude, gain, shift, offset)`` of ``amplitude * tanh(gain a + shift) + offset``.

    The amplitude starts at 1.2 times half the output span, because a sweep that does not reach
    full saturation underestimates it. The gain then matches the straight-line slope, and the
    shift puts the curve's centre where that line crosses the offset.
    """
    low, high = np.percentile(y, [2, 98])
    offset = 0.5 * (low + high)
    amplitude = max(0.6 * (high - low), 1e-12)
    slope, intercept = _slope_guess(a, y)
    if slope == 0:
        slope = max(high - low, 1e-12) / max(float(np.ptp(a)), 1e-12)
    gain = slope / amplitude
    crossing = (offset - intercept) / slope
    return float(amplitude), float(gain), float(-gain * crossing), float(offset)


class Cos2Model(TransferModel):
    """``y = amplitude * cos((pi * a / a_pi + phase) / 2) ** 2 + offset``."""

    name = "cos2"
    parameter_names = ("amplitude", "a_pi", "phase", "offset")
    formula = "y = amplitude * cos^2((pi * a / a_pi + phase) / 2) + offset"

    def function(self, a, amplitude, a_pi, phase, offset):
        c = np.cos(0.5 * (math.pi * a / a_pi + phase))
        return amplitude * c * c + offset

    def derivative(self, a, amplitude, a_pi, phase, offset):
        # d/da cos^2(u) = -sin(2u) du/da, with u = (pi a / a_pi + phase) / 2.
        return -amplitude * np.sin(math.pi * a / a_pi + phase) * (0.5 * math.pi / a_pi)

    def bounds(self):
        return np.array([0.0, 1e-12, -np.inf, -np.inf]), np.full(4, np.inf)

    def guess(self, a, y):
        # cos^2 is affine in cos(omega a) and sin(omega a): y = m + c cos(omega a) + s sin(omega a)
        # with omega = pi / a_pi. For each trial period the rest is linear least squares; the
        # trial with the smallest residual gives the start. Periods from an eighth of the sweep
        # span to sixteen times it cover a sweep from a fraction of a fringe to several fringes.
        span = max(float(np.ptp(a)), 1e-12)
        best = None
        for a_pi in span * np.geomspace(1 / 16, 16, 97):
            omega = math.pi / a_pi
            design = np.column_stack([np.ones_like(a), np.cos(omega * a), np.sin(omega * a)])
            coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
            residual = float(np.sum((design @ coefficients - y) ** 2))
            if best is None or residual < best[0]:
                best = (residual, a_pi, coefficients)
        _, a_pi, (mean, c, s) = best
        half_amplitude = math.hypot(c, s)
        phase = math.atan2(-s, c)
        return np.array([2 * half_amplitude, a_pi, phase, mean - half_amplitude])


_FIXED_MODELS: dict[str, TransferModel] = {
    "linear": LinearModel(),
    "tanh": TanhModel(),
    "sigmoid": SigmoidModel(),
    "cos2": Cos2Model(),
}


def get_model(name: str | TransferModel) -> TransferModel:
    """Return the transfer model called ``name`` (see :data:`MODEL_NAMES`); models pass through."""
    if isinstance(name, TransferModel):
        return name
    if name in _FIXED_MODELS:
        return _FIXED_MODELS[name]
    if isinstance(name, str) and name.startswith("poly") and name[4:].isdigit() and name in MODEL_NAMES:
        return PolynomialModel(int(name[4:]))
    raise ConfigError(f"unknown transfer model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
