"""Fits of transfer models to measured responses, one output channel at a time.

Each channel is fitted with :func:`scipy.optimize.least_squares` in two passes:

1. A robust pass (``soft_l1`` loss) from the model's starting guess, so that a few wild
   readings (a glitch, an overrange that slipped through) do not pull the curve.
2. Points whose residual lies more than ``outlier_threshold`` robust standard deviations from
   the median residual are rejected, and the curve is refitted to the rest with the ordinary
   squared loss. The robust standard deviation is 1.4826 times the median absolute deviation of
   the residuals of the point's neighbours in stimulus order, because the noise often changes
   along the curve (a saturating output is quieter at its rails).

The parameter uncertainties are the square roots of the diagonal of the covariance
``inv(J^T J) * s**2``, with ``J`` the Jacobian at the solution and ``s**2`` the residual
variance ``sum(r**2) / (n - p)``. Scaling by the residuals, as :func:`scipy.optimize.curve_fit`
does by default, keeps the uncertainties honest when the model misses part of the physics
(quantization, a slight nonlinearity) as well as when the readings are noisy.

Goodness of fit: the root-mean-square residual and the coefficient of determination R^2. When
the sweep has repeats, the reduced chi-square compares the residuals with the noise level of
the point means. It is about 1 for a model that explains everything but the noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from ..errors import CalibrationError, ConfigError
from .models import TransferModel, get_model

__all__ = ["ChannelFit", "TransferFit", "fit_channel", "fit_transfer"]

log = logging.getLogger(__name__)

# 1.4826 times the median absolute deviation estimates the standard deviation of normal data.
_MAD_TO_STD = 1.4826


@dataclass(frozen=True)
class ChannelFit:
    """The fitted transfer curve of one output channel.

    Attributes
    ----------
    channel
        Output channel number, from 0.
    model
        Name of the transfer model (see :mod:`pnn.calibration.models`).
    parameters, uncertainties
        Fitted value and standard uncertainty of each model parameter, by name.
    covariance
        Covariance of the parameters, array of shape (p, p) in the order of the model's names.
    stimulus_range
        Smallest and largest stimulus of the fitted points; the curve is trusted inside it.
    n_points
        Points used in the final fit (valid and not rejected).
    outliers
        Indices of the points rejected as outliers, into the fitted data.
    residuals
        Measured minus fitted output at every point of the data, NaN where the reading was
        invalid, array of shape (n,), in the output unit.
    rms
        Root-mean-square residual of the points used, in the output unit.
    r_squared
        Coefficient of determination of the points used.
    noise_std
        Noise level of single readings from the spread of the repeats, or None without repeats.
    reduced_chi2
        Mean squared residual over the variance of a point mean (noise_std**2 / repeats),
        scaled by n / (n - p); None without repeats.
    """

    channel: int
    model: str
    parameters: dict[str, float]
    uncertainties: dict[str, float]
    covariance: np.ndarray
    stimulus_range: tuple[float, float]
    n_points: int
    outliers: tuple[int, ...]
    residuals: np.ndarray
    rms: float
    r_squared: float
    noise_std: float | None
    reduced_chi2: float | None

    @property
    def transfer_model(self) -> TransferModel:
        """The model object."""
        return get_model(self.model)

    def _values(self) -> list[float]:
        return [self.parameters[name] for name in self.transfer_model.parameter_names]

    def predict(self, stimulus: np.ndarray) -> np.ndarray:
        """Return the output the curve predicts for a stimulus (any shape)."""
        return self.transfer_model.function(np.asarray(stimulus, dtype=np.float64), *self._values())

    def to_raw(self, physical: np.ndarray) -> np.ndarray:
        """Convert physical stimulus values into the raw readings the instrument gives for them."""
        return self.predict(physical)

    def to_physical(self, raw: np.ndarray) -> np.ndarray:
        """Convert raw readings into the stimulus, in physical units, that produced them.

        Raises
        ------
        CalibrationError
            If a reading lies outside what the curve reaches over its calibrated range.
        """
        try:
            return self.transfer_model.inverse(np.asarray(raw, dtype=np.float64), self._values(), self.stimulus_range)
        except CalibrationError as exc:
            raise CalibrationError(f"output channel {self.channel}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Return the fit as plain data (no NaN: invalid residuals become None)."""
        return {
            "channel": self.channel,
            "model": self.model,
            "parameters": dict(self.parameters),
            "uncertainties": dict(self.uncertainties),
            "covariance": self.covariance.tolist(),
            "stimulus_range": list(self.stimulus_range),
            "n_points": self.n_points,
            "outliers": list(self.outliers),
            "residuals": [None if not math.isfinite(r) else float(r) for r in self.residuals],
            "rms": self.rms,
            "r_squared": self.r_squared,
            "noise_std": self.noise_std,
            "reduced_chi2": self.reduced_chi2,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChannelFit:
        """Rebuild a fit from :meth:`to_dict`'s output; raises KeyError or TypeError when data is missing."""
        model = get_model(data["model"])
        parameters = {name: float(data["parameters"][name]) for name in model.parameter_names}
        uncertainties = {name: float(data["uncertainties"][name]) for name in model.parameter_names}
        covariance = np.asarray(data["covariance"], dtype=np.float64)
        if covariance.shape != (model.n_parameters, model.n_parameters):
            raise TypeError(f"covariance has shape {covariance.shape}, expected {(model.n_parameters,) * 2}")
        return cls(
            channel=int(data["channel"]),
            model=model.name,
            parameters=parameters,
            uncertainties=uncertainties,
            covariance=covariance,
            stimulus_range=(float(data["stimulus_range"][0]), float(data["stimulus_range"][1])),
            n_points=int(data["n_points"]),
            outliers=tuple(int(i) for i in data["outliers"]),
            residuals=np.array([np.nan if r is None else float(r) for r in data["residuals"]]),
            rms=float(data["rms"]),
            r_squared=float(data["r_squared"]),
            noise_std=None if data["noise_std"] is None else float(data["noise_std"]),
            reduced_chi2=None if data["reduced_chi2"] is None else float(data["reduced_chi2"]),
        )


def _robust_std(values: np.ndarray) -> float:
    deviation = np.abs(values - np.median(values))
    scale = _MAD_TO_STD * float(np.median(deviation))
    if scale == 0:
        # Quantized readings can have most residuals equal; fall back to the plain spread.
        scale = float(np.std(values))
    return scale


def _local_scale(stimulus: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """Return a robust standard deviation of the residuals around each point, array of shape (n,).

    The noise of a reading often depends on where it lies on the curve: a saturating output is
    quieter at its rails than at its centre. One global scale would flag the noisier centre as
    outliers, so each point is judged against the median absolute residual of its neighbours in
    stimulus order (a window of 10 % of the points, at least 21).
    """
    n = len(residuals)
    window = min(n, max(21, n // 10) | 1)
    order = np.argsort(stimulus, kind="stable")
    deviation = np.abs(residuals - np.median(residuals))[order]
    half = window // 2
    padded = np.pad(deviation, half, mode="reflect") if n > half else np.pad(deviation, half, mode="edge")
    local = _MAD_TO_STD * np.median(np.lib.stride_tricks.sliding_window_view(padded, window), axis=1)[:n]
    # A floor of a tenth of the global scale keeps an exactly flat stretch (quantized readings
    # at a rail) from turning every tiny residual there into an outlier.
    floor = 0.1 * _robust_std(residuals)
    scale = np.empty(n)
    scale[order] = np.maximum(local, floor)
    return scale


# Smallest singular value of the column-normalised Jacobian, relative to the largest, below which
# the sweep does not pin a parameter: at 1e-5, some combination of parameters is determined
# 100 000 times worse than the best one. A tanh swept over +-0.3 of its input scale (a hard
# but usable fit) gives about 1e-2; noise swept over +-1e-4 gives about 1e-6.
_IDENTIFIABLE = 1e-5


def _covariance(jacobian: np.ndarray, residuals: np.ndarray, n_parameters: int) -> np.ndarray | None:
    """Return ``inv(J^T J) * s**2``, or None when some parameter is not determined by the data."""
    norms = np.linalg.norm(jacobian, axis=0)
    if jacobian.shape[0] < n_parameters or np.any(norms == 0) or not np.all(np.isfinite(jacobian)):
        return None
    # Columns scaled to unit length, so parameters of very different size are judged alike.
    _, singular, vt = np.linalg.svd(jacobian / norms, full_matrices=False)
    if singular[-1] <= _IDENTIFIABLE * singular[0]:
        return None
    dof = max(len(residuals) - n_parameters, 1)
    variance = float(np.sum(residuals**2)) / dof
    scaled = (vt.T / singular**2) @ vt
    return scaled / np.outer(norms, norms) * variance


def fit_channel(
    stimulus: np.ndarray,
    readings: np.ndarray,
    model: str | TransferModel,
    *,
    channel: int = 0,
    node: str = "node",
    initial: Sequence[float] | None = None,
    robust: bool = True,
    outlier_threshold: float = 5.0,
    max_evaluations: int | None = None,
) -> ChannelFit:
    """Fit a transfer model to one channel's response.

    Parameters
    ----------
    stimulus
        Stimulus of each point, array of shape (n,).
    readings
        Readings of each point, array of shape (n,) or (n, repeats); NaN marks an invalid
        reading. Points are fitted by the mean of their valid repeats.
    model
        A model name or object (see :mod:`pnn.calibration.models`).
    channel, node
        Channel number and node name, for the record and for messages.
    initial
        Starting values of the parameters; None uses the model's guess.
    robust
        Run the robust pass and reject outliers before the final fit.
    outlier_threshold
        Residuals beyond this many robust standard deviations are outliers.
    max_evaluations
        Limit of function evaluations per pass; None uses SciPy's default.

    Raises
    ------
    CalibrationError
        If too few valid points remain, the fit does not converge, or the data do not determine
        every parameter. The message names the node and channel and what to try.
    """
    model = get_model(model)
    where = f"node {node!r} output channel {channel}"
    a = np.asarray(stimulus, dtype=np.float64).reshape(-1)
    y_all = np.asarray(readings, dtype=np.float64)
    if y_all.ndim == 1:
        y_all = y_all[:, None]
    if y_all.shape[0] != a.shape[0]:
        raise ConfigError(f"{where}: {a.shape[0]} stimulus value(s) but {y_all.shape[0]} reading row(s)")
    if not outlier_threshold > 0:
        raise ConfigError(f"outlier_threshold must be positive, got {outlier_threshold}")

    # Mean over valid repeats, and the noise of single readings from their spread.
    valid_repeats = np.isfinite(y_all)
    counts = valid_repeats.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.where(counts > 0, np.where(valid_repeats, y_all, 0.0).sum(axis=1) / np.maximum(counts, 1), np.nan)
    noise_std = None
    if y_all.shape[1] > 1:
        squares = np.where(valid_repeats, (y_all - y[:, None]) ** 2, 0.0).sum()
        dof = int(np.maximum(counts - 1, 0).sum())
        noise_std = math.sqrt(squares / dof) if dof > 0 else None

    valid = np.isfinite(y) & np.isfinite(a)
    n_needed = model.n_parameters + 2
    if np.count_nonzero(valid) < n_needed:
        raise CalibrationError(
            f"{where}: only {int(np.count_nonzero(valid))} valid point(s), the {model.name} fit needs at "
            f"least {n_needed}; check the connections and the input range, then sweep again with more points"
        )
    if np.ptp(a[valid]) == 0:
        raise CalibrationError(
            f"{where}: the stimulus takes a single value over the whole sweep, so no curve can be fitted; "
            "sweep the inputs over a range, or check that the node's weights are not all zero"
        )
    a_fit, y_fit = a[valid], y[valid]
    lower, upper = model.bounds()
    start = np.asarray(model.guess(a_fit, y_fit) if initial is None else initial, dtype=np.float64)
    if start.shape != (model.n_parameters,):
        raise ConfigError(f"{where}: {model.name} takes {model.n_parameters} starting values, got {start.shape[0]}")
    # least_squares rejects a start outside the bounds (a guessed amplitude of 0, say).
    start = np.clip(start, lower, upper)

    def residual(p: np.ndarray, a_values: np.ndarray, y_values: np.ndarray) -> np.ndarray:
        return model.function(a_values, *p) - y_values

    inliers = np.ones(len(a_fit), dtype=bool)
    if robust:
        scale = noise_std / math.sqrt(y_all.shape[1]) if noise_std else 0.01 * max(float(np.ptp(y_fit)), 1e-12)
        first = _solve(residual, start, (a_fit, y_fit), lower, upper, "soft_l1", max(scale, 1e-12), max_evaluations, where, model)
        r = residual(first.x, a_fit, y_fit)
        if _robust_std(r) > 0:
            inliers = np.abs(r - np.median(r)) <= outlier_threshold * _local_scale(a_fit, r)
        if np.count_nonzero(inliers) < n_needed:
            inliers = np.ones(len(a_fit), dtype=bool)
        start = first.x

    final = _solve(residual, start, (a_fit[inliers], y_fit[inliers]), lower, upper, "linear", 1.0, max_evaluations, where, model)
    r_in = residual(final.x, a_fit[inliers], y_fit[inliers])
    covariance = _covariance(final.jac, r_in, model.n_parameters)
    if covariance is None:
        raise CalibrationError(
            f"{where}: the sweep does not determine every parameter of the {model.name} model "
            f"({', '.join(model.parameter_names)}); widen the sweep range so it shows the curve's shape, "
            "or choose a model with fewer parameters such as 'linear'"
        )

    n_used = int(np.count_nonzero(inliers))
    residuals = np.full(len(a), np.nan)
    residuals[valid] = residual(final.x, a_fit, y_fit)
    total = float(np.sum((y_fit[inliers] - y_fit[inliers].mean()) ** 2))
    rms = math.sqrt(float(np.mean(r_in**2)))
    r_squared = 1.0 - float(np.sum(r_in**2)) / total if total > 0 else float("nan")
    reduced_chi2 = None
    if noise_std:
        variance_of_mean = noise_std**2 / y_all.shape[1]
        reduced_chi2 = float(np.sum(r_in**2)) / max(n_used - model.n_parameters, 1) / variance_of_mean
    sigma = np.sqrt(np.clip(np.diag(covariance), 0.0, None))
    outliers = tuple(int(i) for i in np.flatnonzero(valid)[~inliers])
    if outliers:
        log.info("%s: rejected %d outlier(s) of %d point(s)", where, len(outliers), len(a_fit))
    return ChannelFit(
        channel=int(channel),
        model=model.name,
        parameters={name: float(v) for name, v in zip(model.parameter_names, final.x)},
        uncertainties={name: float(s) for name, s in zip(model.parameter_names, sigma)},
        covariance=covariance,
        stimulus_range=(float(a_fit[inliers].min()), float(a_fit[inliers].max())),
        n_points=n_used,
        outliers=outliers,
        residuals=residuals,
        rms=rms,
        r_squared=r_squared,
        noise_std=noise_std,
        reduced_chi2=reduced_chi2,
    )


def _solve(residual, start, data, lower, upper, loss, f_scale, max_evaluations, where, model):
    """Run one least-squares pass; raise CalibrationError naming ``where`` if it fails."""
    try:
        result = least_squares(
            residual, start, args=data, bounds=(lower, upper), loss=loss, f_scale=f_scale,
            max_nfev=max_evaluations, x_scale="jac",
        )
    except (ValueError, np.linalg.LinAlgError) as exc:
        raise CalibrationError(f"{where}: the {model.name} fit failed ({exc}); {_advice(model, data[0])}") from None
    if result.status <= 0 or not np.all(np.isfinite(result.x)):
        raise CalibrationError(
            f"{where}: the {model.name} fit did not converge ({result.message}); {_advice(model, data[0])}"
        )
    return result


def _advice(model: TransferModel, stimulus: np.ndarray) -> str:
    return (
        f"the stimulus spans [{np.min(stimulus):.3g}, {np.max(stimulus):.3g}]: widen the sweep so that it "
        "covers the curve's shape (for a node computing f(W x + b), sweep its weight and bias too), add "
        f"points or repeats, give starting values for {', '.join(model.parameter_names)}, or choose a "
        "simpler model such as 'linear'"
    )


@dataclass(frozen=True)
class TransferFit:
    """The fitted transfer curves of every output channel of a node.

    Attributes
    ----------
    node
        Name of the node.
    model
        Name of the transfer model, the same for every channel.
    channels
        One fit per output channel, in channel order.
    stimulus_unit, output_unit
        Units of the stimulus and of the readings.
    """

    node: str
    model: str
    channels: tuple[ChannelFit, ...]
    stimulus_unit: str = ""
    output_unit: str = ""

    @property
    def n_out(self) -> int:
        """Number of output channels."""
        return len(self.channels)

    def parameter_array(self) -> np.ndarray:
        """Return the parameters of every channel, array of shape (p, n_out), in the model's order."""
        names = get_model(self.model).parameter_names
        return np.array([[fit.parameters[name] for fit in self.channels] for name in names])

    def predict(self, stimulus: np.ndarray) -> np.ndarray:
        """Return the predicted readings for a stimulus of shape (batch, n_out)."""
        return get_model(self.model).function(np.asarray(stimulus, dtype=np.float64), *self.parameter_array())

    def derivative(self, stimulus: np.ndarray) -> np.ndarray:
        """Return the slope ``dy/da`` of every channel at a stimulus of shape (batch, n_out)."""
        return get_model(self.model).derivative(np.asarray(stimulus, dtype=np.float64), *self.parameter_array())

    def summary(self) -> str:
        """Return a table of the fitted parameters with their uncertainties and the fit quality."""
        model = get_model(self.model)
        units = [f"{label} in {unit}" for label, unit in (("a", self.stimulus_unit), ("y", self.output_unit))
                 if unit not in ("", "1")]
        lines = [model.formula + (f"   ({', '.join(units)})" if units else "")]
        header = "  ch " + "".join(f"{name:>22}" for name in model.parameter_names)
        header += f"{'rms':>10}{'R^2':>9}{'chi2/dof':>9}{'outliers':>9}"
        lines.append(header)
        for fit in self.channels:
            cells = "".join(
                f"{_with_uncertainty(fit.parameters[name], fit.uncertainties[name]):>22}"
                for name in model.parameter_names
            )
            chi2 = "-" if fit.reduced_chi2 is None else f"{fit.reduced_chi2:.2f}"
            lines.append(f"  {fit.channel:>2} {cells}{fit.rms:>10.3g}{fit.r_squared:>9.5f}{chi2:>9}{len(fit.outliers):>9}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<TransferFit {self.node!r}: {self.model} on {self.n_out} channel(s)>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self) if cycle else self.summary())


def _with_uncertainty(value: float, sigma: float) -> str:
    """Format ``value +- sigma`` with the value rounded to two significant digits of sigma."""
    if not (math.isfinite(sigma) and sigma > 0):
        return f"{value:.6g}"
    digits = max(0, 1 - int(math.floor(math.log10(sigma))))
    if digits > 8 or abs(value) >= 1e6:
        return f"{value:.4g} +- {sigma:.2g}"
    # Adding 0.0 turns a value that rounds to -0 into 0, so no "-0.0000" is printed.
    return f"{round(value, digits) + 0.0:.{digits}f} +- {sigma:.{digits}f}"


def fit_transfer(
    stimulus: np.ndarray,
    readings: np.ndarray,
    model: str | TransferModel,
    *,
    node: str = "node",
    stimulus_unit: str = "",
    output_unit: str = "",
    initial: Mapping[int, Sequence[float]] | Sequence[float] | None = None,
    robust: bool = True,
    outlier_threshold: float = 5.0,
    max_evaluations: int | None = None,
) -> TransferFit:
    """Fit a transfer model to every output channel.

    Parameters
    ----------
    stimulus
        Stimulus of each point and channel, array of shape (n, n_out).
    readings
        Readings, array of shape (n, repeats, n_out) or (n, n_out).
    model
        A model name or object, the same for every channel.
    initial
        Starting values for every channel (a sequence), or per channel (a mapping from channel
        number to a sequence); None uses the model's guesses.

    Other parameters are those of :func:`fit_channel`.
    """
    model = get_model(model)
    a = np.asarray(stimulus, dtype=np.float64)
    y = np.asarray(readings, dtype=np.float64)
    if y.ndim == 2:
        y = y[:, None, :]
    if a.ndim != 2 or y.ndim != 3 or a.shape[0] != y.shape[0] or a.shape[1] != y.shape[2]:
        raise ConfigError(
            f"node {node!r}: stimulus of shape {a.shape} does not match readings of shape {y.shape}; "
            "expected (n, n_out) and (n, repeats, n_out)"
        )
    fits = []
    for k in range(a.shape[1]):
        if initial is None or isinstance(initial, Mapping):
            start = None if initial is None else initial.get(k)
        else:
            start = initial
        fits.append(fit_channel(
            a[:, k], y[:, :, k], model, channel=k, node=node, initial=start, robust=robust,
            outlier_threshold=outlier_threshold, max_evaluations=max_evaluations,
        ))
    return TransferFit(node=node, model=model.name, channels=tuple(fits), stimulus_unit=stimulus_unit, output_unit=output_unit)
